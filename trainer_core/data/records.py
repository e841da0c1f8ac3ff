"""Record models for each dataset format, format detection, and normalisation to canonical records.

Torch-free: the API validates uploads with these same models.

Canonical records (what `normalize` returns and the trainer consumes; plain JSON-able dicts):

- sft: `{"messages": [{"role", "content"}, ...]}` | `{"prompt": str, "completion": str}` | `{"text": str}`.
  Messages in OpenAI's chat format keep what the chat template and the loss need: an assistant
  turn's `tool_calls` (its `content` may then be null; it becomes ""), a tool turn's
  `tool_call_id`, and `weight` 0 | 1 on assistant turns (0: in the context, not
  trained); a record's `tools` (function definitions) go to the chat template and
  `parallel_tool_calls` is kept. Keys that are absent stay absent.
- preference: raw `{"prompt": str, "chosen": str, "rejected": str}` or conversational
  `{"messages": [...], "chosen": [assistant msgs], "rejected": [assistant msgs]}`. A record is
  conversational when its prompt is a message list or either answer is; a string prompt then
  becomes one user message and a string answer one assistant message. OpenAI's
  `{"input": {"messages"}, "preferred_output", "non_preferred_output"}` normalises to the
  conversational shape.
- prompts: `{"prompt": str}` | `{"messages": [...]}`, plus `"answer": str | None` (numbers become
  strings) and `"difficulty": int | None`, and any other fields of the record as they are (graders
  read them as `{{item.<field>}}`).
- trajectories: `{"text": str}` | `{"steps": [{"type", "content"}]}`, plus optional context
  `"prompt"` | `"messages"` and optional `"teacher_logprobs"`.

Trajectory text and the stored teacher top-k format
---------------------------------------------------
A trajectory is trained as one string, `trajectory_text(record)`: the `text` field as is, or the
steps joined with "\\n", each step prefixed with `STEP_PREFIX[type]` ("Thought: ", "Action: ",
"Observation: ", nothing for "other") unless its content already starts with that prefix.
Its tokens are `tokenizer(trajectory_text, add_special_tokens=False)["input_ids"]` under the
shared student/teacher tokenizer; call them t_0 … t_{T-1}. The context (prompt or messages) is
tokenised separately and placed before them, so the trajectory tokens never depend on it.

`teacher_logprobs` = {
    "top_k_ids":      [[int] * k] * n,    # row i: the teacher's k most likely token ids ...
    "top_k_logprobs": [[float] * k] * n,  # ... and their natural-log probabilities (≤ 0)
    "offset": int = 0,                    # row i describes trajectory token t_{offset+i}
    "token_ids": [int] * n | None,        # optional: t_{offset..offset+n-1}, checked at train time
}
Row i is the teacher's distribution for *predicting* t_{offset+i} given everything before it
(context and t_0 … t_{offset+i-1}) — the same convention as SGLang's `input_top_logprobs`.
Tokens without a row get cross-entropy instead. `k` is the same for every row.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from trainer_core.config import DatasetFormat

Role = Literal["system", "user", "assistant", "tool"]
StepType = Literal["reasoning", "action", "observation", "other"]
FORMATS: tuple[DatasetFormat, ...] = ("sft", "preference", "prompts", "trajectories")
STEP_PREFIX: dict[str, str] = {
    "reasoning": "Thought: ", "action": "Action: ", "observation": "Observation: ", "other": "",
}
# Line starts that make a `text` record look like an agent trace when detecting the format.
_TRACE_MARKERS = ("Thought:", "Action:", "Observation:")


class _Record(BaseModel):
    # Unknown top-level keys (ids, metadata) are common in real datasets and are ignored.
    model_config = ConfigDict(extra="ignore")


class ToolFunction(_Record):
    name: StrictStr = Field(min_length=1)
    arguments: StrictStr


class ToolCall(_Record):
    id: StrictStr
    type: Literal["function"] = "function"
    function: ToolFunction


class Message(_Record):
    role: Role
    content: StrictStr | None
    tool_calls: list[ToolCall] | None = Field(None, min_length=1)
    tool_call_id: StrictStr | None = None
    weight: Literal[0, 1] | None = None

    @model_validator(mode="before")
    @classmethod
    def _tool_call_content(cls, data: Any) -> Any:
        # OpenAI's examples leave `content` out of a tool-calling turn; elsewhere it is required.
        if isinstance(data, dict) and "content" not in data and data.get("tool_calls"):
            return {**data, "content": None}
        return data

    @model_validator(mode="after")
    def _openai_fields(self) -> Message:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content may be null only in an assistant message with tool_calls")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        if self.weight is not None and self.role != "assistant":
            raise ValueError("weight applies to assistant messages only")
        return self

    @property
    def trained(self) -> bool:
        return self.role == "assistant" and self.weight != 0


def _tools(value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    for i, tool in enumerate(value or []):
        if not isinstance(tool.get("function"), dict) or not isinstance(tool["function"].get("name"), str):
            raise ValueError(f"tools[{i}] needs a `function` with a `name`")
    return value


Tools = Annotated[list[dict[str, Any]] | None, AfterValidator(_tools)]


class Step(_Record):
    type: StepType
    content: StrictStr


def _one_of(obj: BaseModel, names: tuple[str, str], required: bool = True) -> None:
    present = [n for n in names if getattr(obj, n) is not None]
    if len(present) > 1:
        raise ValueError(f"give either `{names[0]}` or `{names[1]}`, not both")
    if required and not present:
        raise ValueError(f"`{names[0]}` or `{names[1]}` is required")


def _ends_with_assistant(messages: list[Message], what: str) -> list[Message]:
    if messages[-1].role != "assistant":
        raise ValueError(f"{what} must end with an assistant message")
    return messages


class SFTMessages(_Record):
    messages: list[Message] = Field(min_length=1)
    tools: Tools = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _has_assistant(self) -> SFTMessages:
        if "assistant" not in {m.role for m in self.messages}:
            raise ValueError("messages need at least one assistant message (nothing would be trained)")
        if not any(m.trained for m in self.messages):
            raise ValueError("every assistant message has weight 0 (nothing would be trained)")
        return self


class SFTCompletion(_Record):
    prompt: StrictStr
    completion: StrictStr = Field(min_length=1)


class SFTText(_Record):
    text: StrictStr = Field(min_length=1)


Answer = StrictStr | list[Message]


class PreferenceRecord(_Record):
    prompt: StrictStr | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    chosen: Annotated[Answer, Field(union_mode="left_to_right")]
    rejected: Annotated[Answer, Field(union_mode="left_to_right")]

    @model_validator(mode="after")
    def _shape(self) -> PreferenceRecord:
        _one_of(self, ("prompt", "messages"))
        for name in ("chosen", "rejected"):
            value = getattr(self, name)
            if isinstance(value, list):
                if not value:
                    raise ValueError(f"`{name}` must not be an empty list")
                _ends_with_assistant(value, f"`{name}`")
            elif not value:
                raise ValueError(f"`{name}` must not be empty")
        return self


class _OpenAIInput(_Record):
    messages: list[Message] = Field(min_length=1)
    tools: Tools = None
    parallel_tool_calls: bool | None = None


class OpenAIPreference(_Record):
    input: _OpenAIInput
    preferred_output: list[Message] = Field(min_length=1)
    non_preferred_output: list[Message] = Field(min_length=1)


def _answer_to_str(value: Any) -> Any:
    # Numbers are accepted for convenience; rewards compare strings (numeric_match parses them).
    if isinstance(value, bool):
        raise ValueError("answer must be a string or a number")
    return str(value) if isinstance(value, int | float) else value


class PromptRecord(_Record):
    # Any other fields (a program, test cases, a rubric) are kept for graders: {{item.<field>}}.
    model_config = ConfigDict(extra="allow")

    prompt: StrictStr | None = Field(None, min_length=1)
    messages: list[Message] | None = Field(None, min_length=1)
    answer: Annotated[StrictStr | None, BeforeValidator(_answer_to_str)] = None
    difficulty: StrictInt | None = None

    @model_validator(mode="after")
    def _shape(self) -> PromptRecord:
        _one_of(self, ("prompt", "messages"))
        if self.messages is not None and self.messages[-1].role == "assistant":
            raise ValueError("prompt messages must not end with an assistant message: the model writes it")
        return self


class TeacherLogprobs(_Record):
    top_k_ids: list[list[StrictInt]] = Field(min_length=1)
    top_k_logprobs: list[list[StrictFloat]] = Field(min_length=1)
    offset: StrictInt = Field(0, ge=0)
    token_ids: list[StrictInt] | None = None

    @model_validator(mode="after")
    def _aligned(self) -> TeacherLogprobs:
        n = len(self.top_k_ids)
        if len(self.top_k_logprobs) != n:
            raise ValueError(f"top_k_logprobs has {len(self.top_k_logprobs)} rows, top_k_ids has {n}")
        if self.token_ids is not None and len(self.token_ids) != n:
            raise ValueError(f"token_ids has {len(self.token_ids)} entries, top_k_ids has {n} rows")
        k = len(self.top_k_ids[0])
        for i, (ids, lps) in enumerate(zip(self.top_k_ids, self.top_k_logprobs, strict=True)):
            if len(ids) != k or len(lps) != k or k == 0:
                raise ValueError(f"row {i}: every row needs the same k ≥ 1 ids and log-probs (row 0 has {k})")
            if any(t < 0 for t in ids):
                raise ValueError(f"row {i}: token ids must be ≥ 0")
            if any(not math.isfinite(x) and x != -math.inf or x > 1e-4 for x in lps):
                raise ValueError(f"row {i}: log-probs must be ≤ 0 (natural log) and not NaN")
        return self


class TrajectoryRecord(_Record):
    text: StrictStr | None = Field(None, min_length=1)
    steps: list[Step] | None = Field(None, min_length=1)
    prompt: StrictStr | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    teacher_logprobs: TeacherLogprobs | None = None

    @model_validator(mode="after")
    def _shape(self) -> TrajectoryRecord:
        _one_of(self, ("text", "steps"))
        _one_of(self, ("prompt", "messages"), required=False)
        return self


class RecordError(ValueError):
    """A record does not fit its format; `errors` holds (field path or None, message) pairs."""

    def __init__(self, errors: list[tuple[str | None, str]]) -> None:
        super().__init__("; ".join(f"{f}: {m}" if f else m for f, m in errors))
        self.errors = errors


def _field_path(loc: tuple[int | str, ...]) -> str | None:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or None


def _answer_branch(part: int | str) -> type | None:
    """Returns the Python type of a `str | list[Message]` union branch pydantic names in an error
    location ("str", or "list[…Message]" with the message validators spelled out), else None."""
    if part == "str":
        return str
    return list if isinstance(part, str) and part.startswith("list[") and part.endswith("Message]]") else None


def _record_errors(exc: ValidationError, obj: dict) -> list[tuple[str | None, str]]:
    """Returns (field path, message) pairs, keeping only the union branch the input's type selects."""
    out: list[tuple[str | None, str]] = []
    for err in exc.errors():
        loc, msg = err["loc"], err["msg"].removeprefix("Value error, ")
        branch_at = next((i for i, p in enumerate(loc) if _answer_branch(p) is not None), None)
        if branch_at is not None:
            value = obj.get(loc[0]) if branch_at == 1 else None
            if not isinstance(value, str | list):
                loc, msg = loc[:branch_at], "must be a string or a list of messages"
            elif not isinstance(value, _answer_branch(loc[branch_at])):  # type: ignore[arg-type]
                continue
            else:
                loc = loc[:branch_at] + loc[branch_at + 1 :]
        entry = (_field_path(loc), msg)
        if entry not in out:
            out.append(entry)
    return out


def _record_model(obj: dict, fmt: DatasetFormat) -> type[_Record]:
    if fmt == "sft":
        if "messages" in obj:
            return SFTMessages
        if "prompt" in obj or "completion" in obj:
            return SFTCompletion
        if "text" in obj:
            return SFTText
        raise RecordError([(None, "an sft record needs `messages`, `prompt` + `completion`, or `text`")])
    if fmt == "preference":
        return OpenAIPreference if "input" in obj else PreferenceRecord
    if fmt == "prompts":
        return PromptRecord
    return TrajectoryRecord


def parse_record(obj: Any, fmt: DatasetFormat) -> _Record:
    """Returns the validated record model for `obj` in format `fmt`; raises RecordError."""
    if not isinstance(obj, dict):
        raise RecordError([(None, f"expected a JSON object, got {json_type_name(obj)}")])
    model = _record_model(obj, fmt)
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise RecordError(_record_errors(exc, obj)) from None


def json_type_name(obj: Any) -> str:
    """Returns the JSON name of a parsed value's type (object, array, string, ...)."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if obj is None else names.get(type(obj), type(obj).__name__)


def detect_format(obj: Any) -> DatasetFormat | None:
    """Returns the format an object's keys suggest, or None when none fits (see FORMATS)."""
    if not isinstance(obj, dict):
        return None
    if "chosen" in obj or "rejected" in obj or "preferred_output" in obj:
        return "preference"
    if "steps" in obj or "teacher_logprobs" in obj:
        return "trajectories"
    text = obj.get("text")
    # A trace's `prompt`/`messages` are its context: the marked-up text decides before they do.
    if isinstance(text, str) and any(line.startswith(_TRACE_MARKERS) for line in text.splitlines()):
        return "trajectories"
    if "completion" in obj:
        return "sft"
    if "answer" in obj or "difficulty" in obj:
        return "prompts"
    messages = obj.get("messages")
    if isinstance(messages, list):
        has_assistant = any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages)
        return "sft" if has_assistant else "prompts"
    if "prompt" in obj:
        return "prompts"
    return "sft" if isinstance(text, str) else None


def _dump_messages(messages: list[Message]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        message: dict[str, Any] = {"role": m.role, "content": m.content or ""}
        if m.tool_calls is not None:
            message["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        message.update({k: v for k in ("tool_call_id", "weight") if (v := getattr(m, k)) is not None})
        out.append(message)
    return out


def _with_tools(record: dict[str, Any], source: SFTMessages | _OpenAIInput) -> dict[str, Any]:
    if source.tools is not None:
        record["tools"] = source.tools
    if source.parallel_tool_calls is not None:
        record["parallel_tool_calls"] = source.parallel_tool_calls
    return record


def _as_messages(value: str | list[Message], role: Role) -> list[dict[str, str]]:
    return [{"role": role, "content": value}] if isinstance(value, str) else _dump_messages(value)


def normalize(record: Any, fmt: DatasetFormat) -> dict[str, Any]:
    """Returns the canonical dict (module docstring) for a raw record; raises RecordError."""
    rec = parse_record(record, fmt)
    if isinstance(rec, SFTMessages):
        return _with_tools({"messages": _dump_messages(rec.messages)}, rec)
    if isinstance(rec, SFTCompletion):
        return {"prompt": rec.prompt, "completion": rec.completion}
    if isinstance(rec, SFTText):
        return {"text": rec.text}
    if isinstance(rec, OpenAIPreference):
        return _with_tools({
            "messages": _dump_messages(rec.input.messages),
            "chosen": _dump_messages(rec.preferred_output),
            "rejected": _dump_messages(rec.non_preferred_output),
        }, rec.input)
    if isinstance(rec, PreferenceRecord):
        if rec.prompt is not None and isinstance(rec.chosen, str) and isinstance(rec.rejected, str):
            return {"prompt": rec.prompt, "chosen": rec.chosen, "rejected": rec.rejected}
        prompt = rec.messages if rec.messages is not None else rec.prompt
        return {
            "messages": _as_messages(prompt, "user"),
            "chosen": _as_messages(rec.chosen, "assistant"),
            "rejected": _as_messages(rec.rejected, "assistant"),
        }
    if isinstance(rec, PromptRecord):
        out = {**(rec.model_extra or {}), **_context(rec)}
        out.update(answer=rec.answer, difficulty=rec.difficulty)
        return out
    assert isinstance(rec, TrajectoryRecord)
    out = _context(rec)
    out.update({"text": rec.text} if rec.text is not None else {"steps": [s.model_dump() for s in rec.steps]})
    if rec.teacher_logprobs is not None:
        out["teacher_logprobs"] = rec.teacher_logprobs.model_dump()
    return out


def _context(rec: PromptRecord | TrajectoryRecord) -> dict[str, Any]:
    if rec.messages is not None:
        return {"messages": _dump_messages(rec.messages)}
    return {"prompt": rec.prompt} if rec.prompt is not None else {}


def trajectory_text(record: dict[str, Any]) -> str:
    """Returns the single string a canonical trajectory record is trained on (module docstring)."""
    if record.get("text") is not None:
        return record["text"]
    parts = []
    for step in record["steps"]:
        prefix = STEP_PREFIX[step["type"]]
        content = step["content"]
        parts.append(content if content.startswith(prefix) else prefix + content)
    return "\n".join(parts)
