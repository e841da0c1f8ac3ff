"""Token-by-token decoding of one sequence for serving and evaluation: greedy or sampled, stop strings,
token log-probs and a callback per emitted piece of text (streaming).

Sampling draws from ``softmax(logits / temperature)`` truncated to the nucleus ``top_p`` (Holtzman et
al. 2019, arXiv 1904.09751) with a caller-owned ``torch.Generator``, so a seeded request is
reproducible even while other requests run in other threads. ``temperature == 0`` is greedy.

Reported log-probs are those of the model's own distribution, ``log_softmax(logits)`` before
temperature and top-p, the way OpenAI-compatible servers report them.

One call decodes one sequence: ``SamplingParams.n`` is the caller's loop (with ``for_sample(i)``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from trainer_core.config import SamplingParams, TokenLogprob

FinishReason = Literal["stop", "length"]
# A partially decoded multi-byte character shows up as U+FFFD until its last byte arrives.
_INCOMPLETE_CHAR = "\ufffd"


@dataclass
class Decoded:
    """The result of decoding one sequence: text (stop string excluded), tokens and why it ended."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    logprobs: list[TokenLogprob] | None = None
    prompt_tokens: int = 0
    # Tokens generated but not yet attached to any emitted text (see ``decode``'s ``on_text``).
    _pending: list[TokenLogprob] = field(default_factory=list, repr=False)


TextCallback = Callable[[str, list[TokenLogprob]], None]


def new_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """Returns a generator seeded with ``seed``, or from fresh entropy when ``seed`` is None."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed % (2**63))
    return generator


def _nucleus_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Returns ``logits`` [V] with every token outside the smallest set of mass >= top_p set to -inf."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(descending=True)
    probs = sorted_logits.softmax(dim=-1)
    drop_sorted = probs.cumsum(dim=-1) - probs >= top_p  # the most likely token always stays
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    if params.temperature <= 0:
        return int(logits.argmax())
    probs = _nucleus_filter(logits / params.temperature, params.top_p).softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _token_logprob(
    logits: torch.Tensor, token_id: int, top: int, tokenizer: PreTrainedTokenizerBase
) -> TokenLogprob:
    logps = logits.log_softmax(dim=-1)
    alternatives: tuple[tuple[str, float], ...] = ()
    if top > 0:
        values, ids = logps.topk(min(top, logps.shape[-1]))
        alternatives = tuple((tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, ids, strict=True))
    return TokenLogprob(tokenizer.decode([token_id]), float(logps[token_id]), alternatives)


def _held_back(text: str, stop: Sequence[str]) -> int:
    """Returns how many trailing characters of ``text`` must wait: they may start a stop string."""
    longest = 1 if text.endswith(_INCOMPLETE_CHAR) else 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


def _find_stop(text: str, stop: Sequence[str], start: int) -> int | None:
    """Returns the earliest index at or after ``start`` where a stop string begins, if any."""
    hits = [i for s in stop if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


@torch.no_grad()
def decode(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    eos_token_ids: Sequence[int],
    generator: torch.Generator | None = None,
    on_text: TextCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    turn: AbstractContextManager[Any] | None = None,
) -> Decoded:
    """Returns the continuation of ``prompt_ids`` decoded with a KV cache (model in eval mode, no grad).

    Ends at an eos token, at the first stop string (excluded from the text), after
    ``max_tokens``, or when ``should_stop()`` turns true (a client went away). ``on_text`` is
    called with each new piece of text as soon as it can no longer turn into a stop string, with the
    log-probs of the tokens generated since the previous call. ``turn`` (a fair lock) is held for
    each token's forward pass and detokenisation only, so decodes sharing a model interleave.
    """
    if not prompt_ids:
        raise ValueError("the prompt must have at least one token")
    device = next(model.parameters()).device
    generator = generator or new_generator(params.seed, device)
    eos = set(eos_token_ids)
    want_logprobs = params.logprobs or params.top_logprobs > 0
    max_stop = max((len(s) for s in params.stop), default=0)

    result = Decoded(text="", token_ids=[], finish_reason="length", prompt_tokens=len(prompt_ids))
    all_logprobs: list[TokenLogprob] = []
    emitted = 0
    text = ""
    step_ids = torch.tensor([list(prompt_ids)], device=device)
    cache = None
    for _ in range(params.max_tokens):
        if should_stop is not None and should_stop():
            result.finish_reason = "stop"
            break
        with turn or nullcontext():
            out = model(input_ids=step_ids, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[0, -1].float()
            token = _pick(logits, params, generator)
            if token in eos:  # ends the turn; like the text, log-probs leave it out
                result.finish_reason = "stop"
                break
            if want_logprobs:
                entry = _token_logprob(logits, token, params.top_logprobs, tokenizer)
                all_logprobs.append(entry)
                result._pending.append(entry)
            result.token_ids.append(token)
            text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
        cut = _find_stop(text, params.stop, max(0, emitted - max_stop)) if params.stop else None
        if cut is not None:
            text = text[:cut]
            result.finish_reason = "stop"
            break
        ready = len(text) - _held_back(text, params.stop)
        if on_text is not None and ready > emitted:
            on_text(text[emitted:ready], result._pending)
            result._pending = []
            emitted = ready
        step_ids = torch.tensor([[token]], device=device)

    if on_text is not None and (len(text) > emitted or result._pending):
        on_text(text[emitted:], result._pending)
        result._pending = []
    result.text = text
    result.logprobs = all_logprobs if want_logprobs else None
    return result
