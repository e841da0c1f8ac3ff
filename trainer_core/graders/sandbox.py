"""The grader sandbox: untrusted Python (``python`` graders, ``code_output`` programs) in a separate process.

Two modes, chosen once per process by probing (``Sandbox.describe()`` is the start-up message):

- ``bubblewrap`` (the Debian package, where installed and usable): a new user, PID, network, IPC
  and UTS namespace as uid 65534 with no capabilities; the system directories and the Python
  installation mounted read-only, nothing else of the host (no data, no code tree); a private
  64 MiB ``/tmp`` as the only writable place.
- ``rlimits``: no bubblewrap: the same limits in a fresh network namespace (``unshare``); the file
  system is NOT read-only in this mode, which the start-up message says.

Either way the process sets memory (RLIMIT_AS), CPU-time and file-size limits on itself and a
seccomp filter refusing new processes, then runs a whole batch (``sandbox_runner.py``). A task
that raises, times out or returns a non-number/NaN scores an error; a task that hangs past its
wall-clock limit gets the process killed and the rest of the batch continues in a fresh one.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import selectors
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from trainer_core.errors import GraderFailure
from trainer_core.graders.templates import GradingError

log = logging.getLogger(__name__)

_RUNNER = (Path(__file__).with_name("sandbox_runner.py")).read_text()
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc")
_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8",
    # Numeric libraries must not start thread pools sized for the host.
    "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
}
# Installed packages (numpy, ...) stay importable for graders: the environment's package folders.
_PACKAGE_PATHS = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
_STARTUP_SECONDS = 20.0  # process start and the first answer (a loaded machine can be slow)
_GRACE_SECONDS = 2.0  # past a task's own limit before the process is killed

SandboxMode = Literal["bubblewrap", "rlimits", "unavailable"]


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandbox process; ``timeout`` (wall-clock per task) comes with each batch."""

    memory_bytes: int = 1 << 30
    cpu_seconds_per_task: float = 10.0


class SandboxUnavailable(GraderFailure):
    """Neither bubblewrap nor a network namespace can be had: untrusted code is not run at all."""


def _bubblewrap_command() -> list[str]:
    mounts: list[str] = []
    for folder in _SYSTEM_DIRS:
        mounts += ["--ro-bind-try", folder, folder]
    # The interpreter and its packages, wherever they live (e.g. /opt/venv, a pyenv under /root).
    for folder in sorted({sys.base_prefix, sys.prefix, sys.exec_prefix,
                          str(Path(os.path.realpath(sys.executable)).parent.parent)}):
        if not folder.startswith(_SYSTEM_DIRS):
            mounts += ["--ro-bind", folder, folder]
    # The private /tmp is mounted before the interpreter's folders: an environment that lives under
    # /tmp (a CI clone's .venv) is then bound read-only on top of it instead of being hidden by it.
    return [
        "bwrap", "--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534",
        "--disable-userns", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
        "--dev", "/dev", "--proc", "/proc", "--size", str(64 << 20), "--tmpfs", "/tmp", *mounts,
        "--chdir", "/tmp", *_python_command(),
    ]


def _python_command() -> list[str]:
    # -S: no site module. Processing the environment's .pth files costs more than a whole batch of
    # grading on a small machine; the runner adds the package folders to sys.path itself instead.
    return [sys.executable, "-I", "-S", "-c", _RUNNER]


class Sandbox:
    """Runs batches of untrusted Python in one sandbox process each (module docstring)."""

    def __init__(self, mode: SandboxMode, limits: SandboxLimits = SandboxLimits(), reason: str = "") -> None:
        self.mode, self.limits, self._reason = mode, limits, reason

    def describe(self) -> str:
        """Returns the start-up message: which sandbox python graders run in."""
        if self.mode == "bubblewrap":
            return ("grader sandbox: bubblewrap (no network, read-only system, private /tmp, "
                    f"{self.limits.memory_bytes >> 20} MiB memory, no new processes)")
        if self.mode == "rlimits":
            return ("grader sandbox: rlimits + network namespace (bubblewrap not installed or not usable: "
                    f"{self._reason}; the file system is NOT read-only — install the bubblewrap package); "
                    f"{self.limits.memory_bytes >> 20} MiB memory, no new processes")
        return f"grader sandbox: unavailable ({self._reason}); python and code_output graders cannot run"

    def grade(
        self, source: str, samples: Sequence[dict[str, Any]], items: Sequence[dict[str, Any]], timeout: float
    ) -> list[float | GradingError]:
        """Returns ``grade(sample, item)`` of ``source`` for each pair, or the error of each that failed."""
        tasks = [{"sample": s, "item": i} for s, i in zip(samples, items, strict=True)]
        return [a if isinstance(a, GradingError) else float(a["score"])
                for a in self._batch("grade", source, tasks, timeout)]

    def run_programs(self, programs: Sequence[str], timeout: float) -> list[str | GradingError]:
        """Returns the stdout of each program run as ``__main__``, or the error of each that failed."""
        tasks = [{"program": p} for p in programs]
        return [a if isinstance(a, GradingError) else str(a["stdout"])
                for a in self._batch("run", "", tasks, timeout)]

    def _command(self) -> list[str]:
        if self.mode == "unavailable":
            raise SandboxUnavailable(self.describe())
        return _bubblewrap_command() if self.mode == "bubblewrap" else _python_command()

    def _batch(
        self, mode: str, source: str, tasks: list[dict[str, Any]], timeout: float
    ) -> list[dict[str, Any] | GradingError]:
        answers: list[dict[str, Any] | GradingError] = []
        while len(answers) < len(tasks):
            answers += self._process(mode, source, tasks[len(answers):], timeout)
        return answers

    def _process(
        self, mode: str, source: str, tasks: list[dict[str, Any]], timeout: float
    ) -> list[dict[str, Any] | GradingError]:
        """Returns answers for a prefix of ``tasks`` (all of them unless the process had to be killed)."""
        request = {
            "mode": mode, "source": source, "tasks": tasks, "timeout": timeout,
            "memory_bytes": self.limits.memory_bytes,
            "cpu_seconds": int(self.limits.cpu_seconds_per_task * len(tasks)) + 5,
            "unshare_network": self.mode == "rlimits",
            "paths": _PACKAGE_PATHS,
        }
        payload = json.dumps(request).encode()
        answers: list[dict[str, Any] | GradingError] = []
        with subprocess.Popen(
            self._command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=_ENV, cwd="/", start_new_session=True,
        ) as process:
            assert process.stdin is not None and process.stdout is not None
            try:
                process.stdin.write(payload)
                process.stdin.close()
            except BrokenPipeError:
                pass  # it died before reading: reported below as a missing answer
            lines = _LineReader(process.stdout)
            first = lines.next(_STARTUP_SECONDS)
            if first is None or "fatal" in first:
                process.kill()
                reason = first["fatal"] if first else "the sandbox process did not start"
                raise SandboxUnavailable(f"{self.describe()}: {reason}")
            while len(answers) < len(tasks):
                answer = lines.next(timeout + _GRACE_SECONDS)
                if answer is None:
                    process.kill()
                    status = process.wait()
                    why = "timed out (killed)" if status == -9 else f"the sandbox process ended ({status})"
                    answers.append(GradingError(why))
                    break
                answers.append(GradingError(answer["error"]) if "error" in answer else answer)
            process.kill()
        return answers


class _LineReader:
    """Reads JSON lines from a pipe with a deadline per line."""

    def __init__(self, stream: Any) -> None:
        self._fd = stream.fileno()
        self._buffer = b""
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._fd, selectors.EVENT_READ)
        self._closed = False

    def next(self, timeout: float) -> dict[str, Any] | None:
        """Returns the next JSON line, or None when none came within ``timeout`` or the pipe closed."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if self._closed or left <= 0 or not self._selector.select(left):
                return None
            chunk = os.read(self._fd, 1 << 16)
            if not chunk:
                self._closed = True
                continue
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)


def _probe(mode: SandboxMode) -> str | None:
    """Returns why ``mode`` does not work here, or None when a trivial batch runs in it."""
    try:
        result = Sandbox(mode).grade("def grade(sample, item):\n    return 1\n", [{}], [{}], 10.0)
    except (SandboxUnavailable, OSError) as exc:
        return str(exc)
    return None if result == [1.0] else f"probe answered {result!r}"


@functools.cache
def default_sandbox() -> Sandbox:
    """Returns this process's sandbox: bubblewrap if it works here, else rlimits + network namespace."""
    reason = "the bwrap command is not installed"
    if shutil.which("bwrap"):
        reason = _probe("bubblewrap") or ""
        if not reason:
            sandbox = Sandbox("bubblewrap")
            log.info(sandbox.describe())
            return sandbox
    fallback = _probe("rlimits")
    sandbox = Sandbox("rlimits", reason=reason) if fallback is None else Sandbox(
        "unavailable", reason=f"{reason}; {fallback}")
    log.warning(sandbox.describe())
    return sandbox
