from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from trainer_core.data import IGNORE_INDEX
from trainer_core.data.render import (
    RenderedExample,
    render_preference,
    render_prompt,
    render_sft,
    show_trained_tokens,
)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12+7?"},
    {"role": "assistant", "content": "19"},
    {"role": "user", "content": "And 2+2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _trained(tok: PreTrainedTokenizerBase, ex: RenderedExample) -> str:
    return show_trained_tokens(tok, ex.input_ids, ex.loss_mask)


def test_chat_trains_only_assistant_turns(tok: PreTrainedTokenizerBase) -> None:
    ex = render_sft(tok, {"messages": CHAT}, 512, "right")
    shown = _trained(tok, ex)
    assert shown.count("⟦") == 2
    assert "⟦19<|im_end|>⟧" in shown and "⟦4<|im_end|>⟧" in shown
    assert ex.labels[0] == IGNORE_INDEX and len(ex.labels) == len(ex.input_ids)


def test_template_without_generation_markers_gives_the_same_turns(tok: PreTrainedTokenizerBase) -> None:
    plain = tok.chat_template.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    other = AutoTokenizer.from_pretrained(tok.name_or_path)
    other.chat_template = plain
    ex = render_sft(other, {"messages": CHAT}, 512, "right")
    # Without markers the newline after <|im_end|> belongs to the assistant turn's text.
    assert _trained(other, ex).count("⟦19<|im_end|>\n⟧") == 1
    assert ex.input_ids == render_sft(tok, {"messages": CHAT}, 512, "right").input_ids


def test_prompt_completion_trains_completion_and_eos(tok: PreTrainedTokenizerBase) -> None:
    ex = render_sft(tok, {"prompt": "12+7=", "completion": "19"}, 64, "right")
    assert _trained(tok, ex) == "<|bos|>12+7=⟦19<|im_end|>⟧"
    prompt = render_prompt(tok, {"prompt": "12+7="})
    assert ex.input_ids[: len(prompt)] == prompt


def test_text_trains_everything_but_the_first_token(tok: PreTrainedTokenizerBase) -> None:
    ex = render_sft(tok, {"text": "hello world"}, 64, "right")
    assert _trained(tok, ex) == "<|bos|>⟦hello world⟧"


def test_truncation_policies(tok: PreTrainedTokenizerBase) -> None:
    full = render_sft(tok, {"messages": CHAT}, 512, "right")
    n = len(full) - 3
    right = render_sft(tok, {"messages": CHAT}, n, "right")
    left = render_sft(tok, {"messages": CHAT}, n, "left")
    assert right.input_ids == full.input_ids[:n] and left.input_ids == full.input_ids[-n:]
    assert left.loss_mask[-3:] == full.loss_mask[-3:]
    assert render_sft(tok, {"messages": CHAT}, n, "drop") is None
    # Cutting away every trained token leaves nothing to learn: dropped.
    assert render_sft(tok, {"prompt": "a long prompt here", "completion": "x"}, 3, "right") is None


def test_render_prompt_adds_generation_prompt(tok: PreTrainedTokenizerBase) -> None:
    ids = render_prompt(tok, {"messages": CHAT[:2]})
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_preference_pairs_share_the_prompt(tok: PreTrainedTokenizerBase) -> None:
    record = {
        "messages": CHAT[:2],
        "chosen": [{"role": "assistant", "content": "19"}],
        "rejected": [{"role": "assistant", "content": "20, surely"}],
    }
    chosen, rejected = render_preference(tok, record, 512, "right")
    prompt = render_prompt(tok, record)
    assert chosen.input_ids[: len(prompt)] == rejected.input_ids[: len(prompt)] == prompt
    assert _trained(tok, chosen).endswith("⟦19<|im_end|>⟧\n")
    assert sum(rejected.loss_mask[: len(prompt)]) == 0
    raw = render_preference(tok, {"prompt": "1+1=", "chosen": "2", "rejected": "3"}, 512, "right")
    assert _trained(tok, raw[1]) == "<|bos|>1+1=⟦3<|im_end|>⟧"
    assert render_preference(tok, record, len(prompt) + 1, "drop") is None


def test_weight_zero_turns_are_context_not_targets(tok: PreTrainedTokenizerBase) -> None:
    weighted = [dict(m) for m in CHAT]
    weighted[2]["weight"] = 0
    plain = tok.chat_template.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    other = AutoTokenizer.from_pretrained(tok.name_or_path)
    other.chat_template = plain
    for tokenizer in (tok, other):
        ex = render_sft(tokenizer, {"messages": weighted}, 512, "right")
        shown = _trained(tokenizer, ex)
        assert shown.count("⟦") == 1 and "⟦4<|im_end|>" in shown and "19<|im_end|>" in shown
        assert ex.input_ids == render_sft(tokenizer, {"messages": CHAT}, 512, "right").input_ids


TOOL_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if tools -%}{{- '<|im_start|>tools\\n' + (tools | map(attribute='function.name') | join(',')) "
    "+ '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{{- '<|im_start|>assistant\\n' -}}{%- generation -%}"
    "{%- for call in message.get('tool_calls') or [] -%}{{- 'call ' + call.function.name + ' ' "
    "+ call.function.arguments -}}{%- endfor -%}{{- message['content'] + '<|im_end|>' -}}"
    "{%- endgeneration -%}{{- '\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def test_tools_and_tool_calls_reach_the_template(tok: PreTrainedTokenizerBase) -> None:
    other = AutoTokenizer.from_pretrained(tok.name_or_path)
    other.chat_template = TOOL_TEMPLATE
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "12,7"}}
    record = {"messages": [CHAT[1], {"role": "assistant", "content": "", "tool_calls": [call]},
                           {"role": "tool", "content": "19", "tool_call_id": "c1"},
                           {"role": "assistant", "content": "19"}],
              "tools": [{"type": "function", "function": {"name": "add"}}]}
    shown = _trained(other, render_sft(other, record, 512, "right"))
    assert shown.startswith("<|bos|><|im_start|>tools\nadd<|im_end|>")
    assert "⟦call add 12,7<|im_end|>⟧" in shown and "⟦19<|im_end|>⟧" in shown
    assert render_prompt(other, record)[: len(render_prompt(other, {"messages": [CHAT[1]]}))] != \
        render_prompt(other, {"messages": [CHAT[1]]})
