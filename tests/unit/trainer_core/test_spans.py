from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from trainer_core.config import SpanMarkers
from trainer_core.data.records import normalize
from trainer_core.errors import TrainingDataError
from trainer_core.spans import (
    ACTION,
    OBSERVATION,
    OTHER,
    REASONING,
    Span,
    step_spans,
    text_spans,
    token_span_types,
    trajectory_token_spans,
)

MARKERS = SpanMarkers()
REACT = (
    "Question: what is 2+3, then doubled?\n"
    "Thought: add first.\nAction: calc[2+3]\nObservation: 5\n"
    "Thought: now double.\nAction: calc[5*2]\nObservation: 10\n"
    "Final Answer: 10"
)


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _typed(text: str, markers: SpanMarkers = MARKERS) -> list[tuple[str, str]]:
    spans = text_spans(text, markers)
    assert spans[0].start == 0 and spans[-1].end == len(text)
    assert all(a.end == b.start for a, b in zip(spans, spans[1:], strict=False))
    return [(s.type, text[s.start : s.end]) for s in spans]


def test_multi_turn_react_trace() -> None:
    assert [t for t, _ in _typed(REACT)] == [
        "other", "reasoning", "action", "observation", "reasoning", "action", "observation", "action",
    ]
    assert _typed(REACT)[2] == ("action", "Action: calc[2+3]\n")


def test_markers_count_only_at_line_start_and_outside_code_fences() -> None:
    text = "Thought: I will say Action: inline\n```python\nAction: = 1\n```\nAction: run()"
    assert _typed(text) == [
        ("reasoning", "Thought: I will say Action: inline\n```python\nAction: = 1\n```\n"),
        ("action", "Action: run()"),
    ]
    assert _typed("  Action: indented")[0][0] == "other"


def test_think_blocks_are_reasoning_and_the_rest_is_the_answer() -> None:
    assert _typed("<think>Action: not one\n2+3=5</think>\nThe answer is 5.") == [
        ("reasoning", "<think>Action: not one\n2+3=5</think>"),
        ("action", "\nThe answer is 5."),
    ]
    assert _typed("Intro\n<think>never closed\nObservation: x") == [
        ("other", "Intro\n"), ("reasoning", "<think>never closed\nObservation: x"),
    ]


def test_custom_markers_and_unicode() -> None:
    markers = SpanMarkers(reasoning=["Plan:"], action=["Do:"], observation=["Saw:"], think_tags=None)
    text = "Plan: café ☕ naïve\nDo: 検索[東京]\nSaw: 😀 ok\n<think>x</think>"
    assert [t for t, _ in _typed(text, markers)] == ["reasoning", "action", "observation"]


def test_steps_spans_match_the_rendered_text() -> None:
    steps = [
        {"type": "reasoning", "content": "two\nlines"},
        {"type": "action", "content": "Action: go"},
        {"type": "observation", "content": "done"},
    ]
    text = "Thought: two\nlines\nAction: go\nObservation: done"
    assert [(s.type, text[s.start : s.end]) for s in step_spans(steps)] == [
        ("reasoning", "Thought: two\nlines\n"),
        ("action", "Action: go\n"),
        ("observation", "Observation: done"),
    ]


def test_a_token_straddling_a_boundary_takes_the_span_of_its_first_character() -> None:
    spans = [Span("observation", 0, 5), Span("action", 5, 12)]
    # tokens: "Obs: " [0,5), "5\nAct" straddles [4,9), "ion:" [9,12)
    assert token_span_types([(0, 4), (4, 9), (9, 12)], spans) == [OBSERVATION, OBSERVATION, ACTION]


def test_tokens_follow_spans_with_context_first(tok: PreTrainedTokenizerBase) -> None:
    record = normalize({"prompt": "Solve it.", "text": REACT}, "trajectories")
    traj = trajectory_token_spans(tok, record, MARKERS, 512)
    context = tok("Solve it.")["input_ids"]
    assert traj.input_ids[: len(context)] == context and traj.trajectory_start == len(context)
    assert set(traj.span_type_ids[: len(context)]) == {OTHER}
    reasoning = [i for i, m in zip(traj.input_ids, traj.reasoning_mask, strict=True) if m]
    assert tok.decode(reasoning) == "Thought: add first.\nThought: now double.\n"
    observed = [i for i, t in zip(traj.input_ids, traj.span_type_ids, strict=True) if t == OBSERVATION]
    assert tok.decode(observed) == "Observation: 5\nObservation: 10\n"
    assert traj.span_type_ids[-1] == ACTION and traj.input_ids[-1] == tok.eos_token_id
    sft = traj.as_sft_example()
    assert all(m == 0 for m, t in zip(sft.loss_mask, traj.span_type_ids, strict=True) if t == OBSERVATION)
    assert not any(r and a for r, a in zip(traj.reasoning_mask, traj.action_mask, strict=True))


def test_unicode_tokens_keep_their_span(tok: PreTrainedTokenizerBase) -> None:
    record = normalize({"text": "Thought: 😀 日本\nAction: ☕"}, "trajectories")
    traj = trajectory_token_spans(tok, record, MARKERS, 512)
    action = [i for i, m in zip(traj.input_ids, traj.action_mask, strict=True) if m]
    assert tok.decode(action) == "Action: ☕<|im_end|>"


def _with_teacher(tok: PreTrainedTokenizerBase, offset: int) -> dict:
    ids = tok(REACT, add_special_tokens=False)["input_ids"]
    rows = [[t, 7] for t in ids[offset:]]
    teacher = {"top_k_ids": rows, "top_k_logprobs": [[-0.1, -3.0]] * len(rows), "offset": offset,
               "token_ids": ids[offset:]}
    return normalize({"text": REACT, "teacher_logprobs": teacher}, "trajectories")


def test_teacher_rows_align_and_survive_truncation(tok: PreTrainedTokenizerBase) -> None:
    record = _with_teacher(tok, offset=2)
    full = trajectory_token_spans(tok, record, MARKERS, 512)
    assert full.teacher_start == 1 + 2  # after bos, two trajectory tokens without rows
    for r, row in enumerate(full.teacher_top_k_ids):
        assert full.input_ids[full.teacher_start + r] == row[0]
    n = len(full) - 10
    for policy in ("right", "left"):
        cut = trajectory_token_spans(tok, record, MARKERS, n, policy)
        assert len(cut) == n
        for r, row in enumerate(cut.teacher_top_k_ids):
            assert cut.input_ids[cut.teacher_start + r] == row[0]
    assert trajectory_token_spans(tok, record, MARKERS, n, "drop") is None


def test_teacher_rows_that_do_not_match_the_tokenizer_are_refused(tok: PreTrainedTokenizerBase) -> None:
    record = _with_teacher(tok, offset=0)
    record["teacher_logprobs"]["token_ids"][3] += 1
    with pytest.raises(TrainingDataError, match="differ"):
        trajectory_token_spans(tok, record, MARKERS, 512)
    record["teacher_logprobs"]["offset"] = 5
    with pytest.raises(TrainingDataError, match="covers trajectory tokens up to"):
        trajectory_token_spans(tok, record, MARKERS, 512)


def test_nothing_to_train_is_dropped(tok: PreTrainedTokenizerBase) -> None:
    text = "Observation: only the environment talks here, at some length."
    record = normalize({"text": text}, "trajectories")
    assert trajectory_token_spans(tok, record, MARKERS, 5, "right") is None
    assert REASONING not in trajectory_token_spans(tok, record, MARKERS, 512).span_type_ids
