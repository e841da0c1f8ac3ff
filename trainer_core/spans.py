"""Splits agent trajectories into typed spans (reasoning, action, observation, other) aligned to tokens.

Text trajectories (markers from `config.SpanMarkers`):
- A marker opens a span of its type only at the very start of a line, and not inside a fenced code
  block (```). The span runs until the next marker line and includes the marker itself and the
  line ends, so "Action: x\\n" is all action. Text before the first marker is "other".
- `<think>…</think>` blocks (anywhere, markers inside ignored; an unclosed one runs to the end)
  are reasoning. Text after a closed think block is action — the answer the reasoning led to —
  until the next marker line.
Step trajectories: each step is its own span over `records.trajectory_text`, its prefix included;
the "\\n" joining two steps belongs to the earlier one.

Token alignment: a token belongs to the span containing its first character (its start offset).
A token straddling a boundary (say "\\nAction" merged into one) therefore takes the type of the
span it starts in. Context tokens (prompt/messages) are "other".

Per-token lists index the *target* token, like `render.RenderedExample.loss_mask`: entry i
describes token i as predicted from the tokens before it. Observation and other tokens carry no
loss: `reasoning_mask` and `action_mask` are disjoint and exclude them.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass, replace
from typing import Any

from transformers import PreTrainedTokenizerBase

from trainer_core.config import SpanMarkers
from trainer_core.data.records import trajectory_text
from trainer_core.data.render import RenderedExample, Truncation, render_prompt
from trainer_core.errors import TrainingDataError

SPAN_TYPE_IDS: dict[str, int] = {"other": 0, "reasoning": 1, "action": 2, "observation": 3}
OTHER, REASONING, ACTION, OBSERVATION = 0, 1, 2, 3
_FENCE = "```"


@dataclass(frozen=True)
class Span:
    """A typed character range [start, end) of the trajectory text."""

    type: str
    start: int
    end: int


def _marker_table(markers: SpanMarkers) -> list[tuple[str, str]]:
    table = [(m, kind) for kind in ("reasoning", "action", "observation") for m in getattr(markers, kind)]
    # Longest first, so "Final Answer:" wins over a shorter marker that is its prefix.
    return sorted(table, key=lambda pair: -len(pair[0]))


def _think_blocks(text: str, markers: SpanMarkers) -> list[tuple[int, int]]:
    if markers.think_tags is None:
        return []
    open_tag, close_tag = markers.think_tags
    pattern = re.compile(re.escape(open_tag) + r".*?(?:" + re.escape(close_tag) + r"|\Z)", re.DOTALL)
    return [(m.start(), m.end()) for m in pattern.finditer(text)]


def text_spans(text: str, markers: SpanMarkers) -> list[Span]:
    """Returns the spans of a text trajectory, contiguous and covering the whole text."""
    table = _marker_table(markers)
    close_tag = markers.think_tags[1] if markers.think_tags else None
    thinks = _think_blocks(text, markers)
    spans: list[Span] = []
    current, start, in_fence, pos = "other", 0, False, 0

    def switch(kind: str, at: int) -> None:
        nonlocal current, start
        if at > start:
            spans.append(Span(current, start, at))
        current, start = kind, at

    for block_start, block_end in [*thinks, (len(text), len(text))]:
        for line in text[pos:block_start].splitlines(keepends=True):
            at_line_start = pos == 0 or text[pos - 1] == "\n"
            if at_line_start and line.startswith(_FENCE):
                in_fence = not in_fence
            elif at_line_start and not in_fence:
                kind = next((k for m, k in table if line.startswith(m)), None)
                if kind is not None:
                    switch(kind, pos)
            pos += len(line)
        if block_start < len(text):
            switch("reasoning", block_start)
            closed = close_tag is not None and text.endswith(close_tag, block_start, block_end)
            switch("action" if closed else "reasoning", block_end)
            pos = block_end
    switch("other", len(text))
    return spans


def step_spans(steps: list[dict[str, str]]) -> list[Span]:
    """Returns one span per step over `trajectory_text({"steps": steps})`."""
    spans, pos = [], 0
    for i, step in enumerate(steps):
        end = pos + len(trajectory_text({"steps": [step]})) + (1 if i < len(steps) - 1 else 0)
        spans.append(Span(step["type"], pos, end))
        pos = end
    return spans


def token_span_types(offsets: list[tuple[int, int]], spans: list[Span]) -> list[int]:
    """Returns each token's span type id: the span holding the token's first character."""
    starts = [s.start for s in spans]
    # Spans are contiguous and sorted: a character lies in the last span starting at or before it.
    return [SPAN_TYPE_IDS[spans[max(0, bisect_right(starts, first) - 1)].type] for first, _ in offsets]


@dataclass(frozen=True)
class TokenizedTrajectory:
    """A trajectory's ids with per-token span types, plus the stored teacher rows aligned to them.

    `trajectory_start`: index in `input_ids` of the trajectory's first token t_0 (context before).
    `teacher_start`: index in `input_ids` of the token that teacher row 0 predicts; rows run on
    consecutive tokens. None (and no rows) when the record stores no teacher log-probs.
    """

    input_ids: list[int]
    span_type_ids: list[int]
    trajectory_start: int
    teacher_top_k_ids: list[list[int]] | None = None
    teacher_top_k_logprobs: list[list[float]] | None = None
    teacher_start: int | None = None

    @property
    def reasoning_mask(self) -> list[int]:
        return [int(t == REASONING) for t in self.span_type_ids]

    @property
    def action_mask(self) -> list[int]:
        return [int(t == ACTION) for t in self.span_type_ids]

    def as_sft_example(self) -> RenderedExample:
        """Returns the trajectory as an SFT example trained on its reasoning and action tokens."""
        return RenderedExample(self.input_ids, [int(t in (REASONING, ACTION)) for t in self.span_type_ids])

    def __len__(self) -> int:
        return len(self.input_ids)


def _context_ids(tokenizer: PreTrainedTokenizerBase, record: dict[str, Any]) -> list[int]:
    if record.get("messages") is not None or record.get("prompt") is not None:
        return render_prompt(tokenizer, record)
    return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


def _tokenize(
    tokenizer: PreTrainedTokenizerBase, record: dict[str, Any], markers: SpanMarkers
) -> TokenizedTrajectory:
    text = trajectory_text(record)
    spans = step_spans(record["steps"]) if record.get("steps") else text_spans(text, markers)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, types = list(enc["input_ids"]), token_span_types(enc["offset_mapping"], spans)
    if tokenizer.eos_token_id is not None:
        # Ending the turn is the model's decision, so the closing eos token trains as an action.
        ids.append(tokenizer.eos_token_id)
        types.append(ACTION)
    context = _context_ids(tokenizer, record)
    out = TokenizedTrajectory(context + ids, [OTHER] * len(context) + types, len(context))
    teacher = record.get("teacher_logprobs")
    if teacher is None:
        return out
    rows, offset = teacher["top_k_ids"], teacher["offset"]
    if offset + len(rows) > len(enc["input_ids"]):
        raise TrainingDataError(
            f"teacher_logprobs covers trajectory tokens up to {offset + len(rows)}, but the text has "
            f"{len(enc['input_ids'])} tokens under this tokenizer"
        )
    expected = teacher.get("token_ids")
    if expected is not None and expected != enc["input_ids"][offset : offset + len(rows)]:
        raise TrainingDataError(
            "teacher_logprobs.token_ids differ from this tokenizer's tokens of the trajectory text"
        )
    return replace(
        out, teacher_top_k_ids=rows, teacher_top_k_logprobs=teacher["top_k_logprobs"],
        teacher_start=len(context) + offset,
    )


def _cut(traj: TokenizedTrajectory, keep: slice) -> TokenizedTrajectory:
    first = keep.indices(len(traj))[0]
    out = replace(
        traj, input_ids=traj.input_ids[keep], span_type_ids=traj.span_type_ids[keep],
        trajectory_start=max(0, traj.trajectory_start - first),
    )
    if traj.teacher_start is None:
        return out
    # Keep the teacher rows whose tokens survived, re-indexed to the cut sequence.
    lo = max(0, first - traj.teacher_start)
    hi = max(lo, min(len(traj.teacher_top_k_ids), first + len(out) - traj.teacher_start))
    if lo == hi:
        return replace(out, teacher_top_k_ids=None, teacher_top_k_logprobs=None, teacher_start=None)
    return replace(
        out, teacher_top_k_ids=traj.teacher_top_k_ids[lo:hi],
        teacher_top_k_logprobs=traj.teacher_top_k_logprobs[lo:hi],
        teacher_start=traj.teacher_start + lo - first,
    )


def trajectory_token_spans(
    tokenizer: PreTrainedTokenizerBase, record: dict[str, Any], markers: SpanMarkers, max_seq_len: int,
    truncation: Truncation = "right",
) -> TokenizedTrajectory | None:
    """Returns a canonical trajectory record tokenised with span types, or None when truncation drops it.

    Layout: context ids (`render_prompt` of the prompt/messages, or just bos), then the trajectory
    text's tokens (`add_special_tokens=False`), then eos. Truncation follows `render.truncate`; a
    trajectory left without reasoning or action tokens is dropped too.
    """
    traj = _tokenize(tokenizer, record, markers)
    if len(traj) > max_seq_len:
        if truncation == "drop":
            return None
        traj = _cut(traj, slice(None, max_seq_len) if truncation == "right" else slice(-max_seq_len, None))
    return traj if any(t in (REASONING, ACTION) for t in traj.span_type_ids) else None
