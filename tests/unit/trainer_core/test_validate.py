from __future__ import annotations

import io
import sys
import tracemalloc

import orjson
import pytest

from trainer_core.data.records import RecordError, parse_record
from trainer_core.data.validate import MiB, _Stats, validate_jsonl

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _jsonl(*objs: object) -> bytes:
    return b"".join(orjson.dumps(o) + b"\n" for o in objs)


def test_valid_file_reports_stats_and_calls_back() -> None:
    seen: list[int] = []
    data = _jsonl(CHAT, CHAT, {"messages": [{"role": "system", "content": "s"}, *CHAT["messages"]]})
    report = validate_jsonl(io.BytesIO(data), None, on_record=lambda n, obj: seen.append(n))
    assert report.ok and report.format == "sft" and report.num_records == 3
    assert seen == [1, 2, 3]
    assert report.stats["chars"]["max"] == 8 and report.stats["roles"]["assistant"] == 3
    assert report.stats["turns"]["max"] == 3 and report.stats["shapes"] == {"messages": 3}


def test_validation_module_imports_no_torch() -> None:
    import subprocess

    code = "import sys, trainer_core.data.validate; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bom_crlf_and_blank_lines_are_accepted() -> None:
    data = b"\xef\xbb\xbf" + orjson.dumps(CHAT) + b"\r\n\r\n   \n" + orjson.dumps(CHAT) + b"\r\n"
    report = validate_jsonl(io.BytesIO(data), "sft")
    assert report.ok and report.num_records == 2
    assert (report.stats["utf8_bom"], report.stats["blank_lines"], report.stats["crlf_lines"]) == (1, 2, 3)


def test_line_errors_are_numbered_and_explained() -> None:
    bad_role = {"messages": [*CHAT["messages"], {"role": "x"}]}
    data = (
        _jsonl(CHAT)
        + b"\n"
        + b'{"messages": "caf\xe9"}\n'
        + b'{"messages": [}\n'
        + b"[1, 2]\n"
        + _jsonl(bad_role, {"prompt": "p", "chosen": "a", "rejected": "b"})
        + b'{"text": "no newline at end"}'
    )
    report = validate_jsonl(io.BytesIO(data), None)
    lines = [str(e) for e in report.errors]
    assert lines[0] == "line 3: not valid UTF-8 at byte 18; save the file as UTF-8"
    assert lines[1].startswith("line 4: invalid JSON: unexpected character") and "column 15" in lines[1]
    assert lines[2] == "line 5: expected a JSON object, got array"
    assert "line 6: messages[2].role: Input should be" in lines[3]
    assert "line 6: messages[2].content: Field required" in lines
    assert lines[-1] == "line 7: looks like a `preference` record, but the dataset is `sft`"
    assert report.num_records == 2 and report.num_errors == 5 and not report.ok


def test_errors_are_capped_but_counted() -> None:
    report = validate_jsonl(io.BytesIO(b"nope\n" * 50), "sft", max_errors=3)
    assert report.errors[0].message.startswith("invalid JSON")
    assert len(report.errors) == 3 and report.num_errors == 50


@pytest.mark.parametrize("data", [b"", b"\n\n  \r\n"])
def test_empty_file_is_an_error(data: bytes) -> None:
    report = validate_jsonl(io.BytesIO(data), None)
    assert not report.ok and report.errors[0].message.startswith("the file holds no records")


def test_undetectable_first_line_then_detection() -> None:
    report = validate_jsonl(io.BytesIO(_jsonl({"x": 1}, {"prompt": "2+2=", "answer": 4})), None)
    assert report.format == "prompts" and report.num_records == 1
    assert "cannot tell the dataset format" in report.errors[0].message


class _HugeLineStream(io.RawIOBase):
    """A stream of one valid line, one 50 MB line and one more valid line, generated lazily."""

    def __init__(self) -> None:
        self.parts = [orjson.dumps(CHAT) + b"\n", *([b"x" * MiB] * 50), b"\n", orjson.dumps(CHAT)]

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self.parts.pop(0) if self.parts else b""


def test_giant_line_is_refused_without_holding_it() -> None:
    tracemalloc.start()
    try:
        report = validate_jsonl(_HugeLineStream(), "sft")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    expected = "line 2: longer than the 8 MiB line limit; is the file JSON Lines?"
    assert [str(e) for e in report.errors] == [expected]
    assert report.num_records == 2
    assert peak < 20 * MiB


def test_line_split_across_chunks() -> None:
    data = _jsonl(*[CHAT] * 20)
    report = validate_jsonl(io.BytesIO(data), "sft", chunk_size=7, max_line_bytes=len(orjson.dumps(CHAT)))
    assert report.ok and report.num_records == 20


@pytest.mark.parametrize(
    "obj",
    [
        CHAT,
        {"messages": []},
        {"messages": [{"role": "user", "content": "a"}]},
        {"messages": [{"role": "assistant", "content": None}]},
        {"messages": [{"role": "robot", "content": "a"}]},
        {"messages": [{"role": "assistant", "content": "a", "extra": 1}], "id": 7},
        {"messages": ["assistant"]},
        {"messages": "assistant"},
    ],
)
def test_fast_path_accepts_only_what_the_model_accepts(obj: dict) -> None:
    fast = _Stats().add_plain_chat(obj)
    try:
        parse_record(obj, "sft")
        valid = True
    except RecordError:
        valid = False
    # The fast path may hand a valid record to the model, never accept an invalid one.
    assert fast <= valid
    assert fast or obj is not CHAT


def test_openai_chat_fields_are_validated_on_every_path() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call]},
                         {"role": "tool", "content": "ok", "tool_call_id": "c"},
                         {"role": "assistant", "content": "done", "weight": 1}],
            "tools": [{"type": "function", "function": {"name": "f"}}]}
    bad_weight = {"messages": [{"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "x", "weight": 5}]}
    data = b"\n".join(orjson.dumps(r) for r in (good, bad_weight))
    report = validate_jsonl(io.BytesIO(data), "sft")
    assert report.num_records == 1 and [e.line for e in report.errors] == [2]
    assert "weight" in str(report.errors[0])
