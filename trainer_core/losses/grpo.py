"""Group Relative Policy Optimisation: group-normalised advantages and the clipped token loss.

Formulas (written from the papers):
- GRPO, Shao et al. 2024 (DeepSeekMath, arXiv 2402.03300) eq. 3: per-token surrogate
  -min(rho * A, clip(rho, 1 - eps, 1 + eps) * A) + beta * KL, per-sequence mean then batch mean;
  KL by the k3 estimator exp(ref - logp) - (ref - logp) - 1 (their eq. 4; Schulman 2020,
  "Approximating KL divergence").
- Asymmetric clip epsilon_high and token-level aggregation ("dapo"): Yu et al. 2025
  (DAPO, arXiv 2503.14476) eq. 8 and 10.
- Unscaled advantages ("none"): Liu et al. 2025 (Dr. GRPO, arXiv 2503.20783).
"""

from __future__ import annotations

from typing import Literal

import torch

from trainer_core.losses.common import Metrics, Reduction, check_reduction, masked_mean, masked_sum

AdvantageScaling = Literal["group", "batch", "none"]
ADVANTAGE_SCALINGS: tuple[str, ...] = ("group", "batch", "none")
GrpoAggregation = Literal["grpo", "dapo"]
GRPO_AGGREGATIONS: tuple[str, ...] = ("grpo", "dapo")


def grpo_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scaling: AdvantageScaling = "group",
    eps: float = 1e-4,
) -> tuple[torch.Tensor, Metrics]:
    """Return ``(advantages [B], metrics)`` for rewards [B] laid out as consecutive groups of ``group_size``.

    A = (r - mean_group(r)) / (std + eps), std Bessel-corrected (unbiased), where std is the group's
    std ("group"), the whole batch's std ("batch"), or no division at all ("none": A = r - mean).
    Metrics: ``reward`` (batch mean), ``reward_std`` (mean of the per-group stds),
    ``frac_reward_zero_std`` (fraction of groups whose rewards are all equal: they teach nothing).
    """
    if scaling not in ADVANTAGE_SCALINGS:
        raise ValueError(f"scaling must be one of {ADVANTAGE_SCALINGS}, got {scaling!r}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a Bessel-corrected std needs 2), got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be 1-D with a length divisible by group_size={group_size}, got shape "
            f"{tuple(rewards.shape)}"
        )
    rewards = rewards.detach().float()
    grouped = rewards.view(-1, group_size)
    group_mean = grouped.mean(dim=1, keepdim=True)
    group_std = grouped.std(dim=1, unbiased=True, keepdim=True)
    centred = grouped - group_mean
    if scaling == "group":
        advantages = centred / (group_std + eps)
    elif scaling == "batch":
        advantages = centred / (rewards.std(unbiased=True) + eps)
    else:
        advantages = centred
    metrics: Metrics = {
        "reward": rewards.mean(),
        "reward_std": group_std.mean(),
        # A tolerance instead of == 0: float rounding of equal rewards can leave a ~1e-9 std.
        "frac_reward_zero_std": (group_std < 1e-6).float().mean(),
    }
    return advantages.reshape(-1), metrics


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    aggregation: GrpoAggregation = "grpo",
    reduction: Reduction = "mean",
    num_tokens_in_batch: int | torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Return ``(loss, metrics)``: the clipped GRPO surrogate plus beta * k3 KL.

    ``logps``, ``old_logps``, ``ref_logps``, ``mask``: [B, T] token log-probs of the sampled
    completion tokens; ``advantages``: [B]. With one update per batch pass ``old_logps =
    logps.detach()`` (ratio 1, gradient of the plain policy gradient). ``epsilon_high`` defaults to
    ``epsilon``. ``ref_logps`` may be None only when ``beta == 0``.
    Aggregation: "grpo" = mean over each sequence's tokens, then mean over sequences; "dapo" = sum
    over every completion token in the batch divided by the token count, so long completions weigh
    per token. ``reduction="sum"`` drops the final division: the sum of per-sequence means
    ("grpo", units: sequences) or the token sum ("dapo", units: masked tokens). With "dapo",
    ``num_tokens_in_batch`` replaces this call's token count as the divisor (1 equals "sum").
    ``is_weights`` [B, T] (detached; ``losses.common.truncated_importance_weights``) multiply each
    token's loss when completions were sampled by another engine (TRL's vLLM correction).
    Metrics: ``kl`` (masked mean k3 KL; only when ``ref_logps`` is given), ``clip_ratio`` (fraction
    of tokens whose clipped term was the active one), ``clip_ratio/low``, ``clip_ratio/high``.
    """
    check_reduction(reduction)
    if aggregation not in GRPO_AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {GRPO_AGGREGATIONS}, got {aggregation!r}")
    if beta != 0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps (the KL penalty is against the reference model)")
    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.bool()
    adv = advantages.detach().unsqueeze(-1)

    ratio = torch.exp(logps - old_logps.detach())
    clipped_ratio = ratio.clamp(1 - eps_low, 1 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped_ratio * adv)

    kl: torch.Tensor | None = None
    if ref_logps is not None:
        log_ref_over_policy = ref_logps.detach() - logps
        kl = torch.exp(log_ref_over_policy) - log_ref_over_policy - 1
        if beta != 0:
            per_token = per_token + beta * kl
    if is_weights is not None:
        per_token = per_token * is_weights.detach()

    if aggregation == "grpo":
        per_sequence = masked_mean(per_token, mask, dim=-1)
        loss = per_sequence.mean() if reduction == "mean" else per_sequence.sum()
    else:
        loss = masked_sum(per_token, mask)
        if num_tokens_in_batch is not None:
            loss = loss / num_tokens_in_batch
        elif reduction == "mean":
            loss = loss / mask.sum().clamp(min=1)

    with torch.no_grad():
        # The clipped term is active (gradient zero) when the ratio left the trust region in the
        # direction the advantage pushes it.
        low = (ratio < 1 - eps_low) & (adv < 0)
        high = (ratio > 1 + eps_high) & (adv > 0)
        metrics: Metrics = {
            "clip_ratio": masked_mean((low | high).float(), mask),
            "clip_ratio/low": masked_mean(low.float(), mask),
            "clip_ratio/high": masked_mean(high.float(), mask),
        }
        if kl is not None:
            metrics["kl"] = masked_mean(kl.detach(), mask)
    return loss, metrics
