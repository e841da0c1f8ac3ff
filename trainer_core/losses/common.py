"""Tensor helpers shared by the losses: masked reductions, token log-probs, entropy.

Label convention used by every loss in this package: ``labels[..., t]`` is the target for
``logits[..., t, :]``. The caller has already shifted (for a causal LM, ``labels[t]`` is
``input_ids[t + 1]``), so nothing here shifts again. Positions equal to ``IGNORE_INDEX`` carry no
loss.

Metrics are returned as detached 0-dim tensors (or python numbers) so that a training step does not
force a device sync; call ``float()`` on them when reporting.
"""

from __future__ import annotations

from typing import Literal

import torch

from trainer_core.data import IGNORE_INDEX

Metrics = dict[str, float | torch.Tensor]
# "mean": the loss averaged over its units (tokens, pairs, sequences). "sum": summed over them, for a
# training loop that accumulates sums and divides by the whole step's unit count (exact gradient
# accumulation however the units fall across micro-batches).
Reduction = Literal["mean", "sum"]
REDUCTIONS: tuple[str, ...] = ("mean", "sum")


def check_reduction(reduction: str) -> None:
    """Raise ValueError unless ``reduction`` is "mean" or "sum"."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Return the sum of ``values`` where ``mask`` is true (over ``dim``, or everything)."""
    zeroed = torch.where(mask.bool(), values, torch.zeros_like(values))
    return zeroed.sum() if dim is None else zeroed.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Return the mean of ``values`` where ``mask`` is true; 0 where the mask is empty.

    An empty mask gives 0 rather than NaN so that a micro-batch without loss tokens adds nothing
    (and no NaN gradient) instead of poisoning the accumulated step.
    """
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim=dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def token_logps(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(logps, mask)``: log p(label) per position (0 where ignored) and the label mask.

    Computed as ``logit[label] - logsumexp(logits)`` in float32, which avoids materialising a second
    full-vocabulary ``log_softmax`` tensor.
    """
    mask = labels != ignore_index
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))
    logits32 = logits.float()
    picked = logits32.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    logps = picked - torch.logsumexp(logits32, dim=-1)
    return torch.where(mask, logps, torch.zeros_like(logps)), mask


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Return the entropy (nats) of softmax(logits) at each position: shape ``logits.shape[:-1]``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def policy_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Return the mean token entropy of the policy over ``mask`` (detached; PPO's ``policy/entropy``)."""
    with torch.no_grad():
        return masked_mean(token_entropy(logits), mask)


def truncated_importance_weights(
    trainer_logps: torch.Tensor, engine_logps: torch.Tensor, mask: torch.Tensor, cap: float
) -> tuple[torch.Tensor, Metrics]:
    """Return ``(weights, metrics)``: per-token min(pi_train / pi_engine, cap), detached, 0 off ``mask``.

    Corrects for sampling with an engine whose probabilities differ slightly from the trainer's
    (truncated importance sampling, as TRL's vLLM path and verl do). Metrics: ``rollout/is_weight``
    (mean weight), ``rollout/is_truncated`` (fraction of tokens at the cap) and
    ``rollout/logp_gap`` (mean |log pi_train - log pi_engine|).
    """
    mask = mask.bool()
    gap = (trainer_logps - engine_logps).detach().float()
    ratio = torch.exp(gap)
    weights = torch.where(mask, ratio.clamp(max=cap), torch.zeros_like(ratio))
    metrics: Metrics = {
        "rollout/is_weight": masked_mean(weights, mask),
        "rollout/is_truncated": masked_mean((ratio > cap).float(), mask),
        "rollout/logp_gap": masked_mean(gap.abs(), mask),
    }
    return weights, metrics
