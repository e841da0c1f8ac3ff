"""Turns canonical records into token ids and loss masks with the model's own chat template.

`loss_mask[i] == 1` means token i is a training target (predicted from the tokens before it);
`RenderedExample.labels` is the ids with IGNORE_INDEX where the mask is 0 (the model shifts).

- Conversations go through `tokenizer.apply_chat_template` (with the record's `tools`, if any).
  Only assistant turns are trained, and of those not the ones with OpenAI's `weight: 0`:
  from the template's `{% generation %}` markers when it has them, otherwise from the character
  spans each assistant turn adds to the rendered text (the template must render a conversation's
  prefix as a prefix of the whole, which ChatML-style templates do).
- A string `prompt` is plain text (no chat template), continued by the completion and the eos
  token; the completion and eos are trained.
- `text` records train every token (except the first, which nothing predicts).

Truncation (`max_seq_len`): "right" cuts the end, "left" cuts the start (keeping the completion),
"drop" returns None for an over-long example. An example whose trained tokens were all cut is also
returned as None: callers skip and count those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from trainer_core.data import IGNORE_INDEX

Truncation = Literal["right", "left", "drop"]


@dataclass(frozen=True)
class RenderedExample:
    """Token ids of one training sequence and which of them are trained."""

    input_ids: list[int]
    loss_mask: list[int]

    @property
    def labels(self) -> list[int]:
        return [t if m else IGNORE_INDEX for t, m in zip(self.input_ids, self.loss_mask, strict=True)]

    @property
    def num_trained(self) -> int:
        return sum(self.loss_mask)

    def __len__(self) -> int:
        return len(self.input_ids)


def truncate(example: RenderedExample, max_seq_len: int, truncation: Truncation) -> RenderedExample | None:
    """Returns the example cut to `max_seq_len` by the policy, or None (dropped / nothing left to train)."""
    if len(example) > max_seq_len:
        if truncation == "drop":
            return None
        cut = slice(None, max_seq_len) if truncation == "right" else slice(-max_seq_len, None)
        example = RenderedExample(example.input_ids[cut], example.loss_mask[cut])
    return example if example.num_trained else None


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, *, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _has_generation_markers(tokenizer: PreTrainedTokenizerBase) -> bool:
    template = tokenizer.chat_template
    return isinstance(template, str) and "generation" in template and "endgeneration" in template


_PREFIX_ERROR = (
    "the chat template does not render a conversation's prefix as a prefix of the whole; "
    "add {% generation %} markers around assistant content to the template"
)


def _trained_turn(message: dict[str, Any]) -> bool:
    # OpenAI's per-message weight: an assistant turn with weight 0 is context, not a target.
    return message["role"] == "assistant" and message.get("weight", 1) != 0


def _render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
) -> RenderedExample:
    """Returns the conversation's ids with its trained assistant turns marked (tools go to the template)."""
    extra: dict[str, Any] = {"tools": tools} if tools else {}
    if _has_generation_markers(tokenizer):
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **extra
        )
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        for i, message in enumerate(messages):
            if message["role"] == "assistant" and not _trained_turn(message):
                start, end = _turn_tokens(tokenizer, messages, i, ids, extra)
                mask[start:end] = [0] * (end - start)
        return RenderedExample(ids, mask)
    text = tokenizer.apply_chat_template(messages, tokenize=False, **extra)
    spans = []
    for i, message in enumerate(messages):
        if not _trained_turn(message):
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True,
                                               **extra)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False, **extra)
        if not (text.startswith(before) and text.startswith(through)):
            raise ValueError(_PREFIX_ERROR)
        spans.append((len(before), len(through)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    # A token is trained when its first character lies inside an assistant turn.
    mask = [int(any(a <= start < b for a, b in spans)) for start, _ in enc["offset_mapping"]]
    return RenderedExample(list(enc["input_ids"]), mask)


def _turn_tokens(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], index: int,
                 ids: list[int], extra: dict[str, Any]) -> tuple[int, int]:
    """Returns the token range [start, end) that assistant turn `index` adds to the conversation's ids."""

    def ids_of(part: list[dict[str, Any]], prompt: bool) -> list[int]:
        out = tokenizer.apply_chat_template(part, tokenize=True, return_dict=True,
                                            add_generation_prompt=prompt, **extra)
        return list(out["input_ids"])

    before, through = ids_of(messages[:index], True), ids_of(messages[: index + 1], False)
    if ids[: len(before)] != before or ids[: len(through)] != through:
        raise ValueError(_PREFIX_ERROR)
    return len(before), len(through)


def _render_completion(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str) -> RenderedExample:
    prompt_ids = _encode(tokenizer, prompt, special=True)
    completion_ids = _encode(tokenizer, completion, special=False) + [tokenizer.eos_token_id]
    return RenderedExample(prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids))


def render_sft(
    tokenizer: PreTrainedTokenizerBase, record: dict[str, Any], max_seq_len: int, truncation: Truncation
) -> RenderedExample | None:
    """Returns a canonical sft record's ids and loss mask, or None when truncation drops it."""
    if "messages" in record:
        example = _render_chat(tokenizer, record["messages"], record.get("tools"))
    elif "completion" in record:
        example = _render_completion(tokenizer, record["prompt"], record["completion"])
    else:
        ids = _encode(tokenizer, record["text"], special=True)
        example = RenderedExample(ids, [0] + [1] * (len(ids) - 1))
    return truncate(example, max_seq_len, truncation)


def render_prompt(tokenizer: PreTrainedTokenizerBase, record: dict[str, Any]) -> list[int]:
    """Returns the ids a model continues from: messages with the generation prompt, or the plain prompt."""
    if record.get("messages") is not None:
        extra = {"tools": record["tools"]} if record.get("tools") else {}
        out = tokenizer.apply_chat_template(
            record["messages"], tokenize=True, return_dict=True, add_generation_prompt=True, **extra
        )
        return list(out["input_ids"])
    return _encode(tokenizer, record["prompt"], special=True)


def _render_answer(
    tokenizer: PreTrainedTokenizerBase, record: dict[str, Any], prompt_ids: list[int], answer: Any
) -> RenderedExample:
    if record.get("messages") is None:
        return _render_completion(tokenizer, record["prompt"], answer)
    full = _render_chat(tokenizer, record["messages"] + answer, record.get("tools"))
    if full.input_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template renders the prompt differently once the answer follows it")
    mask = [0] * len(prompt_ids) + full.loss_mask[len(prompt_ids) :]
    return RenderedExample(full.input_ids, mask)


def render_response(tokenizer: PreTrainedTokenizerBase, record: dict[str, Any], text: str) -> RenderedExample:
    """Returns a record's prompt followed by ``text`` as its answer, rendered as preference answers are."""
    answer: Any = text if record.get("messages") is None else [{"role": "assistant", "content": text}]
    return _render_answer(tokenizer, record, render_prompt(tokenizer, record), answer)


def render_preference(
    tokenizer: PreTrainedTokenizerBase, record: dict[str, Any], max_seq_len: int, truncation: Truncation
) -> tuple[RenderedExample, RenderedExample] | None:
    """Returns (chosen, rejected) sharing the record's prompt, or None when truncation drops either.

    Each sequence is truncated on its own; with "left" a long prompt loses its start.
    """
    prompt_ids = render_prompt(tokenizer, record)
    pair = []
    for answer in (record["chosen"], record["rejected"]):
        example = truncate(_render_answer(tokenizer, record, prompt_ids, answer), max_seq_len, truncation)
        if example is None:
            return None
        pair.append(example)
    return pair[0], pair[1]


def show_trained_tokens(tokenizer: PreTrainedTokenizerBase, ids: list[int], mask: list[int]) -> str:
    """Returns the decoded text with each trained run of tokens wrapped in ⟦ ⟧."""
    parts: list[str] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            text = tokenizer.decode(ids[start:i])
            parts.append(f"⟦{text}⟧" if mask[start] else text)
            start = i
    return "".join(parts)
