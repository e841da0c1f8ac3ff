"""The grader sandbox holds: hostile python graders score 0, are counted, and the batch goes on.

Runs for real: bubblewrap where installed (``bubblewrap`` cases skip without it) and the rlimits +
network-namespace fallback.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from trainer_core.grader_config import CodeOutputGrader, PythonGrader
from trainer_core.graders.sandbox import Sandbox, SandboxUnavailable, default_sandbox
from trainer_core.graders.scoring import GraderRuntime, build_grader

HOSTILE = '''
import os, socket, time

def grade(sample, item):
    case = item["case"]
    if case == "fine":
        return len(sample["output_text"]) / 10
    if case == "socket":
        socket.create_connection(("127.0.0.1", item["port"]), timeout=2)
        return 1
    if case == "write":
        with open(item["path"], "w") as f:
            f.write("escaped")
        return 1
    if case == "tmp":
        with open("/tmp/scratch", "w") as f:
            f.write("ok")
        return 0.5
    if case == "loop":
        while True:
            pass
    if case == "fork_bomb":
        while True:
            os.fork()
    if case == "allocate_4gb":
        block = bytearray(4 * 1024 ** 3)
        return len(block)
    if case == "nan":
        return float("nan")
    if case == "text":
        return "1"
    if case == "raise":
        raise RuntimeError("grader bug")
    if case == "stubborn":  # swallows its own timeout: the process is killed from outside
        while True:
            try:
                time.sleep(60)
            except BaseException:
                pass
'''


@pytest.fixture
def listener() -> Iterator[tuple[int, list[int]]]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    accepted: list[int] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                server.accept()[0].close()
                accepted.append(1)
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    server.close()


MODES = [
    pytest.param("bubblewrap", marks=pytest.mark.skipif(shutil.which("bwrap") is None,
                                                        reason="bubblewrap (bwrap) is not installed")),
    "rlimits",
]


@pytest.mark.parametrize("mode", MODES)
def test_hostile_graders_score_zero_and_the_batch_goes_on(mode: str, listener, tmp_path) -> None:
    port, accepted = listener
    outside = tmp_path / "escaped.txt"
    cases = ["fine", "socket", "loop", "fork_bomb", "allocate_4gb", "nan", "text", "raise", "stubborn",
             "tmp", "fine"]
    if mode == "bubblewrap":  # the fallback does not make the file system read-only (it says so)
        cases.insert(2, "write")
    items = [{"case": case, "port": port, "path": str(outside)} for case in cases]
    spec = PythonGrader(type="python", name="py", source=HOSTILE, timeout_seconds=1.0)
    grader = build_grader(spec, GraderRuntime(sandbox=lambda: Sandbox(mode)))
    started = time.monotonic()
    scores = grader(["abcde"] * len(cases), items)
    elapsed = time.monotonic() - started

    by_case = dict(zip(cases, scores.totals, strict=True))
    assert by_case["fine"] == 0.5 and scores.totals[-1] == 0.5  # the batch went on after every failure
    assert by_case["tmp"] == 0.5  # its own temporary directory is writable
    for case in cases:
        if case not in ("fine", "tmp"):
            assert by_case[case] == 0.0, case
    assert scores.errors == {"py": len(cases) - 3}
    assert scores.metrics()["rewards/py/errors"] == len(cases) - 3
    assert accepted == []  # the server on 127.0.0.1 never saw a connection
    assert not outside.exists()
    # Each runaway case is stopped within its 1 s limit (+ the kill grace for the stubborn one).
    assert elapsed < 20, elapsed
    assert all(message.startswith("py: ") for message in scores.messages)


@pytest.mark.parametrize("mode", MODES)
def test_each_limit_gives_its_own_error(mode: str, listener, tmp_path) -> None:
    port, _ = listener
    cases = ["socket", "loop", "fork_bomb", "allocate_4gb", "stubborn"]
    cases += ["write"] if mode == "bubblewrap" else []
    errors = Sandbox(mode).grade(HOSTILE, [{"output_text": ""}] * len(cases),
                                 [{"case": c, "port": port, "path": "/usr/escaped"} for c in cases], 1.0)
    text = dict(zip(cases, (str(e) for e in errors), strict=True))
    assert "refused" in text["socket"] or "unreachable" in text["socket"]
    assert text["loop"] == "timed out"
    assert "Operation not permitted" in text["fork_bomb"]
    assert "MemoryError" in text["allocate_4gb"]
    assert "killed" in text["stubborn"]
    if mode == "bubblewrap":
        assert "Read-only file system" in text["write"]


def test_one_sandbox_process_scores_a_whole_batch() -> None:
    source = "import os\ndef grade(sample, item):\n    return os.getpid()\n"
    pids = default_sandbox().grade(source, [{}] * 20, [{}] * 20, 5.0)
    assert len(set(pids)) == 1


def test_a_grader_that_fails_to_load_scores_every_sample_zero() -> None:
    source = "x = 1 / 0\ndef grade(sample, item):\n    return 1\n"
    scores = default_sandbox().grade(source, [{}] * 3, [{}] * 3, 5)
    assert all("failed to load" in str(s) for s in scores)


def test_code_output_runs_each_distinct_program_once_in_the_sandbox() -> None:
    spec = CodeOutputGrader(type="code_output", name="out", comparison="normalized", timeout_seconds=1.0)
    grader = build_grader(spec)
    programs = [
        {"program": "for i in range(3):\n    print(i * i)"},
        {"program": "for i in range(3):\n    print(i * i)"},
        {"program": "print('x' * 3)"},
        {"program": "while True: pass"},
        {"program": "import sys\nprint('a')\nsys.exit(0)\nprint('b')"},
    ]
    scores = grader(["0 1 4", "0 1 5", "xxx", "anything", "a"], programs)
    assert scores.totals == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert scores.errors == {"out": 1}
    assert "timed out" in scores.messages[0]


def test_the_start_up_message_says_which_sandbox() -> None:
    sandbox = default_sandbox()
    expected = "bubblewrap" if shutil.which("bwrap") else "rlimits"
    assert sandbox.mode == expected
    assert sandbox.describe().startswith(f"grader sandbox: {expected}")
    with pytest.raises(SandboxUnavailable, match="unavailable"):
        Sandbox("unavailable", reason="no namespaces").grade("def grade(s, i):\n    return 1", [{}], [{}], 1)
