from __future__ import annotations

import pytest

from trainer_core.data.records import RecordError, detect_format, normalize, trajectory_text

USER = {"role": "user", "content": "What is 12+7?"}
ASSISTANT = {"role": "assistant", "content": "19"}


@pytest.mark.parametrize(
    ("obj", "fmt"),
    [
        ({"messages": [USER, ASSISTANT]}, "sft"),
        ({"prompt": "12+7=", "completion": "19"}, "sft"),
        ({"text": "plain prose"}, "sft"),
        ({"prompt": "q", "chosen": "a", "rejected": "b"}, "preference"),
        ({"input": {"messages": [USER]}, "preferred_output": [ASSISTANT]}, "preference"),
        ({"prompt": "12+7="}, "prompts"),
        ({"messages": [USER], "answer": 19}, "prompts"),
        ({"text": "Thought: add\nAction: calc[1+1]\nObservation: 2"}, "trajectories"),
        ({"prompt": "1+1?", "text": "Thought: add\nAnswer: 2"}, "trajectories"),
        ({"messages": [USER], "text": "Thought: add\nAnswer: 19"}, "trajectories"),
        ({"prompt": "q", "text": "plain prose"}, "prompts"),
        ({"steps": [{"type": "action", "content": "x"}]}, "trajectories"),
        ({"foo": 1}, None),
        ([1, 2], None),
    ],
)
def test_detect_format(obj: object, fmt: str | None) -> None:
    assert detect_format(obj) == fmt


def test_sft_shapes_normalise() -> None:
    rec = {"messages": [{"role": "system", "content": "s", "name": "x"}, USER, ASSISTANT], "id": 3}
    assert normalize(rec, "sft") == {"messages": [{"role": "system", "content": "s"}, USER, ASSISTANT]}
    assert normalize({"prompt": "a", "completion": "b"}, "sft") == {"prompt": "a", "completion": "b"}
    assert normalize({"text": "t"}, "sft") == {"text": "t"}


def test_errors_carry_field_paths() -> None:
    with pytest.raises(RecordError) as err:
        normalize({"messages": [USER, ASSISTANT, {"role": "bot", "content": "x"}]}, "sft")
    assert err.value.errors[0][0] == "messages[2].role"
    with pytest.raises(RecordError, match="at least one assistant"):
        normalize({"messages": [USER]}, "sft")
    with pytest.raises(RecordError, match="needs `messages`"):
        normalize({"mesages": []}, "sft")
    with pytest.raises(RecordError, match="expected a JSON object, got array"):
        normalize([1], "sft")


def test_preference_normalises_to_conversational_when_any_part_is_a_list() -> None:
    raw = normalize({"prompt": "q", "chosen": "a", "rejected": "b"}, "preference")
    assert raw == {"prompt": "q", "chosen": "a", "rejected": "b"}
    mixed = normalize({"prompt": "q", "chosen": [ASSISTANT], "rejected": "no"}, "preference")
    assert mixed == {
        "messages": [{"role": "user", "content": "q"}],
        "chosen": [ASSISTANT],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    openai = {
        "input": {"messages": [USER]},
        "preferred_output": [ASSISTANT],
        "non_preferred_output": [{"role": "assistant", "content": "20"}],
    }
    assert normalize(openai, "preference")["rejected"] == [{"role": "assistant", "content": "20"}]


def test_preference_errors_follow_the_given_union_branch() -> None:
    with pytest.raises(RecordError) as err:
        normalize({"prompt": "q", "chosen": [{"role": "bot", "content": "a"}], "rejected": "b"}, "preference")
    assert err.value.errors == [("chosen[0].role", "Input should be 'system', 'user', 'assistant' or 'tool'")]
    with pytest.raises(RecordError) as err:
        normalize({"prompt": "q", "chosen": 5, "rejected": "b"}, "preference")
    assert err.value.errors == [("chosen", "must be a string or a list of messages")]
    with pytest.raises(RecordError, match="either `prompt` or `messages`"):
        normalize({"prompt": "q", "messages": [USER], "chosen": "a", "rejected": "b"}, "preference")


def test_prompts_answer_and_difficulty() -> None:
    assert normalize({"prompt": "1+1=", "answer": 2, "difficulty": 3}, "prompts") == {
        "prompt": "1+1=", "answer": "2", "difficulty": 3,
    }
    with pytest.raises(RecordError, match="string or a number"):
        normalize({"prompt": "x", "answer": True}, "prompts")
    with pytest.raises(RecordError, match="must not end with an assistant"):
        normalize({"messages": [USER, ASSISTANT]}, "prompts")


def test_prompts_keep_extra_fields_for_graders() -> None:
    record = {"prompt": "What does it print?", "program": "print(2 * 3)", "tests": [1, 2], "meta": {"k": 1}}
    assert normalize(record, "prompts") == {**record, "answer": None, "difficulty": None}


def test_trajectory_steps_text_and_teacher_logprobs() -> None:
    rec = normalize(
        {
            "prompt": "Add 2 and 3.",
            "steps": [
                {"type": "reasoning", "content": "I add."},
                {"type": "action", "content": "Action: calc[2+3]"},
                {"type": "observation", "content": "5"},
                {"type": "other", "content": "done"},
            ],
            "teacher_logprobs": {"top_k_ids": [[1, 2], [3, 4]], "top_k_logprobs": [[-0.1, -2], [0, -3.5]]},
        },
        "trajectories",
    )
    assert trajectory_text(rec) == "Thought: I add.\nAction: calc[2+3]\nObservation: 5\ndone"
    assert rec["teacher_logprobs"]["offset"] == 0
    assert rec["prompt"] == "Add 2 and 3."


@pytest.mark.parametrize(
    ("logprobs", "message"),
    [
        ({"top_k_ids": [[1, 2]], "top_k_logprobs": [[-0.1]]}, "same k"),
        ({"top_k_ids": [[1], [2]], "top_k_logprobs": [[-0.1]]}, "1 rows"),
        ({"top_k_ids": [[1]], "top_k_logprobs": [[0.5]]}, "≤ 0"),
        ({"top_k_ids": [[1]], "top_k_logprobs": [[-1.0]], "token_ids": [1, 2]}, "token_ids has 2"),
        ({"top_k_ids": [[-1]], "top_k_logprobs": [[-1.0]]}, "≥ 0"),
    ],
)
def test_teacher_logprobs_shape_errors(logprobs: dict, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        normalize({"text": "Thought: x", "teacher_logprobs": logprobs}, "trajectories")


TOOL_CALL = {"id": "call_1", "type": "function",
             "function": {"name": "add", "arguments": '{"a": 12, "b": 7}'}}
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


def test_openai_chat_with_tools_and_weights_normalises() -> None:
    rec = {"messages": [USER, {"role": "assistant", "tool_calls": [TOOL_CALL], "weight": 0},
                        {"role": "tool", "content": "19", "tool_call_id": "call_1"},
                        {"role": "assistant", "content": "19", "weight": 1}],
           "tools": TOOLS, "parallel_tool_calls": False}
    assert normalize(rec, "sft") == {
        "messages": [USER, {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL], "weight": 0},
                     {"role": "tool", "content": "19", "tool_call_id": "call_1"},
                     {"role": "assistant", "content": "19", "weight": 1}],
        "tools": TOOLS, "parallel_tool_calls": False}
    dpo = {"input": {"messages": [USER], "tools": TOOLS}, "preferred_output": [ASSISTANT],
           "non_preferred_output": [{"role": "assistant", "content": "20"}]}
    assert normalize(dpo, "preference")["tools"] == TOOLS


@pytest.mark.parametrize(("messages", "message"), [
    ([USER, {"role": "assistant", "content": None}], "content may be null only"),
    ([{**USER, "weight": 0}, ASSISTANT], "weight applies to assistant messages only"),
    ([USER, {**ASSISTANT, "weight": 0}], "every assistant message has weight 0"),
    ([USER, {**ASSISTANT, "weight": 2}], "weight"),
    ([{**USER, "tool_calls": [TOOL_CALL]}, ASSISTANT], "only assistant messages have tool_calls"),
])
def test_openai_chat_fields_are_checked(messages: list[dict], message: str) -> None:
    with pytest.raises(RecordError, match=message):
        normalize({"messages": messages}, "sft")
