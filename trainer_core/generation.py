"""Batched sampling with a KV cache for the RL stages, and the policy forward over sampled completions.

Sampling draws from ``softmax(logits / temperature)`` truncated to the nucleus ``top_p`` (Holtzman et
al. 2019, arXiv 1904.09751) with a caller-owned ``torch.Generator``, so a rollout is a pure function
of (weights, prompts, generator seed): the stage seeds it from (run seed, step) and a resumed run
samples the same completions.

Log-prob convention shared with the losses: a completion token's log-prob is taken under
``log_softmax(logits / temperature)`` over the full vocabulary (before top-p truncation), both when
sampling and when the loss recomputes it, so the importance ratio is 1 at the sampling weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from trainer_core.losses.chunked import chunked_token_logps
from trainer_core.modeling import head_inputs
from trainer_core.reporting import raise_if_stopping

# How often sampling asks whether to stop: a few forward passes, well under a second on any model.
STOP_CHECK_TOKENS = 8


@dataclass(frozen=True)
class Completions:
    """Sampled completions for a batch of prompts, with the sampler's per-token log-probs.

    ``prompt_ids``/``prompt_mask`` [B, P]: prompts left-padded (mask true on real tokens).
    ``completion_ids``/``completion_mask`` [B, T]: completions right-padded; the mask is true on
    generated tokens up to and including the first eos. ``logps`` [B, T] float32: log-prob of each
    sampled token (0 where masked). ``truncated`` [B]: stopped by ``max_new_tokens`` before any eos.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logps: torch.Tensor
    truncated: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        """Returns [B] the number of generated tokens of each completion (eos included)."""
        return self.completion_mask.sum(dim=-1)

    def completion_token_lists(self) -> list[list[int]]:
        """Returns each completion's tokens without padding (eos included when generated)."""
        return [row[m].tolist() for row, m in zip(self.completion_ids, self.completion_mask, strict=True)]


@dataclass(frozen=True)
class CompletionForward:
    """A forward pass over prompt + completion, sliced to the positions that predict completion tokens.

    ``logps`` [B, T] log-probs of the completion tokens under softmax(logits / temperature) (0
    where masked); ``entropy`` [B, T] (detached) of that distribution, only when requested;
    ``hidden`` [B, T, H] last hidden states at those positions (only when requested, for a value
    head). No [B, T, V] logits are kept: the LM head runs a chunk of tokens at a time.
    """

    logps: torch.Tensor
    entropy: torch.Tensor | None
    hidden: torch.Tensor | None


def seeded_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Returns a generator on ``device`` whose stream depends only on ``keys`` (e.g. seed, stage, step)."""
    seed = 0
    for key in keys:
        # Polynomial mixing with a large odd multiplier keeps distinct key tuples on distinct streams.
        seed = (seed * 1_000_003 + key) % (2**63)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def stop_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Returns the ids that end a completion: the tokenizer's eos and the generation config's eos ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos:
        ids.update(config_eos)
    if not ids:
        raise ValueError("neither the tokenizer nor the generation config names an eos token")
    return sorted(ids)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Yields with ``model`` in eval mode (no dropout) and restores its training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(ids, mask)`` [B, max_len]: the sequences left-padded, mask true on real tokens."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("every prompt must have at least one token")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, width - len(seq) :] = True
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # Left padding shifts the real tokens right; positions must count real tokens only so that a
    # padded prompt is encoded exactly as it would be alone.
    return (mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def _nucleus_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Returns ``logits`` with every token outside the smallest set of mass >= top_p set to -inf."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the mass before it already reaches top_p; the most likely token always stays.
    drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


@torch.no_grad()
def sample_completions(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    generator: torch.Generator,
    temperature: float = 1.0,
    top_p: float = 1.0,
    should_stop: Callable[[], bool] | None = None,
) -> Completions:
    """Returns completions sampled for ``prompts`` (token lists) with a KV cache, in eval mode.

    Decoding stops for a row at its first token in ``eos_token_ids`` and for the batch when every
    row stopped or ``max_new_tokens`` were generated. ``should_stop`` is asked every
    ``STOP_CHECK_TOKENS`` tokens; when true, StopRequested ends the sampling.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = (t.to(device) for t in left_pad(prompts, pad_token_id))
    batch = prompt_ids.shape[0]
    eos = torch.as_tensor(list(eos_token_ids), device=device)

    tokens: list[torch.Tensor] = []
    logps: list[torch.Tensor] = []
    alive: list[torch.Tensor] = []
    running = torch.ones(batch, dtype=torch.bool, device=device)
    attention = prompt_mask.long()
    positions = _positions(prompt_mask)
    step_ids, step_positions, cache = prompt_ids, positions, None
    with eval_mode(model):
        for position in range(max_new_tokens):
            if position % STOP_CHECK_TOKENS == 0:
                raise_if_stopping(should_stop)
            out = model(
                input_ids=step_ids,
                attention_mask=attention,
                position_ids=step_positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,  # the prompt pass would otherwise project every prompt position
            )
            cache = out.past_key_values
            scaled = out.logits[:, -1, :].float() / temperature
            probs = _nucleus_filter(scaled, top_p).softmax(dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            token = torch.where(running, token, torch.full_like(token, pad_token_id))
            tokens.append(token)
            logps.append(scaled.log_softmax(dim=-1).gather(-1, token.unsqueeze(-1)).squeeze(-1))
            alive.append(running.clone())
            running = running & ~torch.isin(token, eos)
            if not running.any():
                break
            step_ids = token.unsqueeze(-1)
            step_positions = step_positions[:, -1:] + 1
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=-1)

    completion_mask = torch.stack(alive, dim=1)
    completion_logps = torch.stack(logps, dim=1)
    return Completions(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=torch.stack(tokens, dim=1),
        completion_mask=completion_mask,
        logps=torch.where(completion_mask, completion_logps, torch.zeros_like(completion_logps)),
        truncated=running,
    )


def completion_forward(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    with_hidden: bool = False,
    with_entropy: bool = False,
) -> CompletionForward:
    """Returns the completion tokens' log-probs (and entropy, hidden states) under the model.

    One full forward over ``[prompt | completion]``; position P-1+j predicts completion token j.
    Only completion positions go through the LM head, a chunk at a time. Runs with whatever grad
    mode and train/eval mode the caller set.
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention = torch.cat([prompt_mask, completion_mask], dim=1)
    out = head_inputs(model, {"input_ids": input_ids, "attention_mask": attention.long(),
                              "position_ids": _positions(attention)})
    prompt_len, completion_len = prompt_ids.shape[1], completion_ids.shape[1]
    window = slice(prompt_len - 1, prompt_len - 1 + completion_len)
    hidden = out.hidden[:, window, :]
    keep = completion_mask.bool()
    picked, entropy = chunked_token_logps(hidden[keep], out.head, completion_ids[keep], out.vocab,
                                          temperature=temperature, with_entropy=with_entropy)
    logps = torch.zeros(keep.shape, dtype=picked.dtype, device=picked.device).masked_scatter(keep, picked)
    per_token_entropy = None
    if entropy is not None:
        per_token_entropy = torch.zeros(keep.shape, dtype=entropy.dtype, device=entropy.device)
        per_token_entropy[keep] = entropy
    return CompletionForward(logps=logps, entropy=per_token_entropy, hidden=hidden if with_hidden else None)


def concat_completions(parts: Sequence[Completions], pad_token_id: int) -> Completions:
    """Returns one batch holding ``parts`` in order: prompts re-left-padded, completions re-right-padded."""
    prompt_width = max(p.prompt_ids.shape[1] for p in parts)
    width = max(p.completion_ids.shape[1] for p in parts)

    def left(t: torch.Tensor, value: float) -> torch.Tensor:
        return torch.nn.functional.pad(t, (prompt_width - t.shape[1], 0), value=value)

    def right(t: torch.Tensor, value: float) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return Completions(
        prompt_ids=torch.cat([left(p.prompt_ids, pad_token_id) for p in parts]),
        prompt_mask=torch.cat([left(p.prompt_mask, False) for p in parts]),
        completion_ids=torch.cat([right(p.completion_ids, pad_token_id) for p in parts]),
        completion_mask=torch.cat([right(p.completion_mask, False) for p in parts]),
        logps=torch.cat([right(p.logps, 0.0) for p in parts]),
        truncated=torch.cat([p.truncated for p in parts]),
    )

