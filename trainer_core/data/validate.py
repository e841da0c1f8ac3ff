"""Streaming validation of a JSONL dataset: returns a report with line-numbered errors and length stats.

Torch-free (the API runs it on upload). The stream is read in fixed-size chunks; a line longer than
`max_line_bytes` is reported and skipped without ever being held whole, so memory stays bounded by
the chunk size plus the line limit whatever the file holds.

Accepted quirks: a UTF-8 byte-order mark on line 1 (skipped, noted in stats), CRLF line ends, blank
lines (skipped, counted in stats). Line numbers count from 1 and include blank lines, as an
editor shows them; byte positions in UTF-8 errors count from 1 within the line.

Throughput measured on this project's shared CPU box (380-byte three-message sft lines): about
155 MB/s with the plain-chat fast path, about 75 MB/s when every line goes through pydantic.
"""

from __future__ import annotations

import re
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO, get_args

import orjson

from trainer_core.config import DatasetFormat
from trainer_core.data.records import (
    OpenAIPreference,
    PreferenceRecord,
    PromptRecord,
    RecordError,
    Role,
    SFTCompletion,
    SFTMessages,
    SFTText,
    TrajectoryRecord,
    detect_format,
    json_type_name,
    parse_record,
)

MiB = 1024 * 1024
_BOM = b"\xef\xbb\xbf"
# Rough characters-per-token for English under BPE tokenizers: stats only, never a limit.
CHARS_PER_TOKEN = 4
_ROLES = frozenset(get_args(Role))
_ORJSON_POSITION = re.compile(r": line \d+ column \d+ \(char \d+\)$")


@dataclass(frozen=True)
class LineError:
    line: int | None  # None: the error is about the whole file
    field: str | None  # a path like "messages[2].role", None for the whole line
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        return where + (f"{self.field}: " if self.field else "") + self.message


@dataclass
class ValidationReport:
    """The outcome of validating one file; `errors` and `warnings` keep their first `max_errors` entries.

    Warnings are valid records that are almost certainly a data bug (a preference pair whose two
    answers are equal carries no DPO gradient); they do not make the dataset invalid.
    """

    format: DatasetFormat | None
    num_records: int = 0
    num_errors: int = 0  # invalid lines, counted past max_errors
    errors: list[LineError] = field(default_factory=list)
    num_warnings: int = 0
    warnings: list[LineError] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.num_errors == 0 and self.num_records > 0

    def to_dict(self) -> dict[str, Any]:
        """Returns the JSON-able report (errors as {line, field, message})."""
        return {
            "format": self.format, "num_records": self.num_records, "num_errors": self.num_errors,
            "errors": [asdict(e) for e in self.errors], "num_warnings": self.num_warnings,
            "warnings": [asdict(w) for w in self.warnings], "stats": self.stats,
        }


def _lines(stream: BinaryIO, max_line_bytes: int, chunk_size: int) -> Iterator[bytes | None]:
    """Yields each line without its newline, or None for a line longer than `max_line_bytes`."""
    pending = bytearray()
    overflow = False  # inside a too-long line whose bytes are being discarded
    while chunk := stream.read(chunk_size):
        pieces = chunk.split(b"\n")
        tail = pieces.pop()
        for i, piece in enumerate(pieces):
            if i == 0 and (overflow or pending):
                if overflow:
                    overflow = False
                    yield None
                    continue
                piece = bytes(pending) + piece
                pending.clear()
            yield piece if len(piece) <= max_line_bytes else None
        if not overflow:
            pending += tail
            if len(pending) > max_line_bytes:
                overflow = True
                pending.clear()
    if overflow:
        yield None
    elif pending:
        yield bytes(pending)


def _json_error(line: bytes, exc: orjson.JSONDecodeError) -> str:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"not valid UTF-8 at byte {bad.start + 1}; save the file as UTF-8"
    return f"invalid JSON: {_ORJSON_POSITION.sub('', str(exc))} at column {exc.colno}"


def _summary(values: array) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    n = len(ordered)
    return {
        "min": ordered[0], "max": ordered[-1], "mean": round(sum(ordered) / n, 2),
        "p50": ordered[(n - 1) // 2], "p95": ordered[min(n - 1, (95 * n) // 100)],
    }


def _chars(value: str | list | None) -> int:
    if value is None:
        return 0
    return len(value) if isinstance(value, str) else sum(len(m.content or "") for m in value)


class _Stats:
    """Accumulates per-record lengths, shapes, roles and turns."""

    def __init__(self) -> None:
        self.chars = array("q")
        self.turns = array("q")
        self.roles: Counter[str] = Counter()
        self.shapes: Counter[str] = Counter()
        self.step_types: Counter[str] = Counter()
        self.with_teacher_logprobs = 0

    def add(self, rec: Any) -> None:
        shape, chars, messages = self._measure(rec)
        self._count(shape, chars, None if messages is None else [m.role for m in messages])

    def add_plain_chat(self, obj: Any) -> bool:
        """Returns True after counting an sft `messages` record that is plainly valid.

        A fast path for the commonest record shape: it accepts a strict subset of what
        `SFTMessages` accepts; anything else (and every error message) goes through the model.
        """
        messages = obj.get("messages") if type(obj) is dict else None
        if type(messages) is not list or not messages or "tools" in obj:
            return False
        chars, roles = 0, []
        for m in messages:
            if type(m) is not dict or m.get("role") not in _ROLES or "weight" in m or "tool_calls" in m:
                return False
            if type(content := m.get("content")) is not str:
                return False
            chars += len(content)
            roles.append(m["role"])
        if "assistant" not in roles:
            return False
        self._count("messages", chars, roles)
        return True

    def _count(self, shape: str, chars: int, roles: list[str] | None) -> None:
        self.shapes[shape] += 1
        self.chars.append(chars)
        if roles is not None:
            self.turns.append(len(roles))
            counter = self.roles
            for role in roles:
                counter[role] += 1

    def _measure(self, rec: Any) -> tuple[str, int, list | None]:
        if isinstance(rec, SFTMessages):
            return "messages", _chars(rec.messages), rec.messages
        if isinstance(rec, SFTCompletion):
            return "prompt_completion", len(rec.prompt) + len(rec.completion), None
        if isinstance(rec, SFTText):
            return "text", len(rec.text), None
        if isinstance(rec, OpenAIPreference):
            parts = (rec.input.messages, rec.preferred_output, rec.non_preferred_output)
            return "openai_preference", sum(map(_chars, parts)), rec.input.messages
        shape = "messages" if rec.messages is not None else "prompt"
        chars = _chars(rec.messages if rec.messages is not None else rec.prompt)
        if isinstance(rec, PreferenceRecord):
            return shape, chars + _chars(rec.chosen) + _chars(rec.rejected), rec.messages
        if isinstance(rec, PromptRecord):
            return shape, chars, rec.messages
        return self._measure_trajectory(rec, chars)

    def _measure_trajectory(self, rec: TrajectoryRecord, prompt_chars: int) -> tuple[str, int, None]:
        self.with_teacher_logprobs += rec.teacher_logprobs is not None
        if rec.steps is not None:
            self.step_types.update(s.type for s in rec.steps)
            return "steps", prompt_chars + sum(len(s.content) for s in rec.steps), None
        return "text", prompt_chars + len(rec.text or ""), None

    def to_dict(self, num_records: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "num_records": num_records,
            "chars": _summary(self.chars),
            "approx_tokens": _summary(array("q", (c // CHARS_PER_TOKEN for c in self.chars))),
            "shapes": dict(self.shapes),
        }
        if self.turns:
            out["turns"] = _summary(self.turns)
            out["roles"] = dict(self.roles)
        if self.step_types:
            out["step_types"] = dict(self.step_types)
        if self.with_teacher_logprobs:
            out["with_teacher_logprobs"] = self.with_teacher_logprobs
        return out


def validate_jsonl(
    stream: BinaryIO,
    fmt: DatasetFormat | None,
    *,
    max_errors: int = 20,
    max_line_bytes: int = 8 * MiB,
    on_record: Callable[[int, dict[str, Any]], None] | None = None,
    chunk_size: int = MiB,
) -> ValidationReport:
    """Returns the validation report for a JSONL byte stream in format `fmt` (None: detect it).

    With `fmt` None the format is detected from the first valid JSON object; every later line
    must match it. `on_record(line_number, obj)` is called with each valid record's parsed JSON.
    """
    report = ValidationReport(format=fmt)
    stats = _Stats()
    notes: Counter[str] = Counter()

    def fail(line: int | None, message: str, path: str | None = None) -> None:
        if len(report.errors) < max_errors:
            report.errors.append(LineError(line, path, message))

    for number, raw in enumerate(_lines(stream, max_line_bytes, chunk_size), start=1):
        if raw is None:
            report.num_errors += 1
            fail(number, f"longer than the {max_line_bytes / MiB:g} MiB line limit; is the file JSON Lines?")
            continue
        if number == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
            notes["utf8_bom"] = 1
        if raw.endswith(b"\r"):
            raw = raw[:-1]
            notes["crlf_lines"] += 1
        if not raw or raw.isspace():
            notes["blank_lines"] += 1
            continue
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            report.num_errors += 1
            fail(number, _json_error(raw, exc))
            continue
        if report.format is None:
            if not isinstance(obj, dict) or (detected := detect_format(obj)) is None:
                report.num_errors += 1
                fail(number, _undetectable(obj))
                continue
            report.format = detected
        if not (report.format == "sft" and stats.add_plain_chat(obj)):
            try:
                rec = parse_record(obj, report.format)
            except RecordError as exc:
                report.num_errors += 1
                for path, message in exc.errors:
                    fail(number, message, path)
                # The field errors say what is wrong; this says why the line may be in the wrong file.
                looks_like = detect_format(obj)
                if looks_like not in (None, report.format):
                    fail(number, f"looks like a `{looks_like}` record, but the dataset is `{report.format}`")
                continue
            stats.add(rec)
            if (same := _identical_answers(rec)) is not None:
                report.num_warnings += 1
                if len(report.warnings) < max_errors:
                    report.warnings.append(LineError(number, same, DEGENERATE_PAIR))
        report.num_records += 1
        if on_record is not None:
            on_record(number, obj)

    if report.num_records == 0 and report.num_errors == 0:
        report.num_errors = 1
        fail(None, "the file holds no records (it is empty or only blank lines)")
    report.stats = stats.to_dict(report.num_records) | dict(notes)
    return report


DEGENERATE_PAIR = ("the chosen and rejected answers are identical: the pair carries no preference signal "
                   "(no DPO gradient); this is usually a data bug")


def _identical_answers(rec: Any) -> str | None:
    """Returns the field holding the preferred answer when a preference pair's two answers are equal."""
    if isinstance(rec, PreferenceRecord) and rec.chosen == rec.rejected:
        return "chosen"
    if isinstance(rec, OpenAIPreference) and rec.preferred_output == rec.non_preferred_output:
        return "preferred_output"
    return None


def _undetectable(obj: Any) -> str:
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {json_type_name(obj)}"
    keys = ", ".join(sorted(obj)[:8]) or "none"
    return (
        f"cannot tell the dataset format from the keys ({keys}); expected messages, prompt/completion, "
        "text, chosen/rejected, prompt/answer or steps — or pass `format` explicitly"
    )
