"""PPO for language models: KL-shaped token rewards, GAE, whitening and the clipped losses.

Formulas (written from the papers):
- Clipped policy and value losses: Schulman et al. 2017 (PPO, arXiv 1707.06347) eq. 7; the value
  clipping follows the same paper's reference implementation as described in Huang et al. 2022,
  "The 37 implementation details of PPO" (detail 9).
- GAE: Schulman et al. 2016 (arXiv 1506.02438) eq. 16: delta_t = r_t + gamma V_{t+1} - V_t,
  A_t = delta_t + gamma lambda A_{t+1}.
- Per-token reward -kl_coef (logp - ref_logp) with the scalar score on the last token:
  Ziegler et al. 2019 (arXiv 1909.08593) section 2.2; Ouyang et al. 2022 (InstructGPT) eq. 2.
- ``policy/approxkl`` = 0.5 mean (logp - old_logp)^2, the k2 estimator of Schulman 2020,
  "Approximating KL divergence".
"""

from __future__ import annotations

import torch

from trainer_core.losses.common import Metrics, Reduction, check_reduction, masked_mean, masked_sum


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Return [B] the index of the last true position of each row of ``mask`` [B, T]; -1 if none."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=-1).values


def ppo_per_token_rewards(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float = 0.05,
) -> tuple[torch.Tensor, Metrics]:
    """Return ``(rewards [B, T], metrics)``: -kl_coef (logp - ref_logp) per token, score on the last token.

    ``logps``, ``ref_logps``, ``mask``: [B, T] over completion tokens; ``scores``: [B]. Rows with an
    empty mask get no reward. Metrics: ``objective/kl`` (mean over sequences of the summed
    log-ratio), ``objective/scores`` (mean score).
    """
    mask = mask.bool()
    with torch.no_grad():
        log_ratio = torch.where(mask, logps - ref_logps, torch.zeros_like(logps)).float()
        rewards = -kl_coef * log_ratio
        last = last_valid_index(mask)
        has_tokens = last >= 0
        rows = torch.arange(rewards.shape[0], device=rewards.device)[has_tokens]
        rewards[rows, last[has_tokens]] += scores.float()[has_tokens]
        metrics: Metrics = {
            "objective/kl": log_ratio.sum(dim=-1).mean(),
            "objective/scores": scores.float().mean(),
        }
    return rewards, metrics


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(advantages, returns)`` [B, T] by generalised advantage estimation over masked tokens.

    Positions outside ``mask`` are skipped: they get advantage and return 0, and the recursion
    links each valid token to the next valid one, so a gap inside a completion (e.g. tool output)
    does not break the credit assignment. After the last valid token V = 0 (the episode ends).
    returns = advantages + values.
    """
    mask = mask.bool()
    with torch.no_grad():
        rewards = rewards.float()
        values = values.float()
        advantages = torch.zeros_like(rewards)
        next_value = torch.zeros_like(rewards[:, 0])
        next_advantage = torch.zeros_like(rewards[:, 0])
        for t in reversed(range(rewards.shape[1])):
            valid = mask[:, t]
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            advantage_t = delta + gamma * lam * next_advantage
            advantages[:, t] = torch.where(valid, advantage_t, torch.zeros_like(advantage_t))
            next_value = torch.where(valid, values[:, t], next_value)
            next_advantage = torch.where(valid, advantage_t, next_advantage)
        returns = torch.where(mask, advantages + values, torch.zeros_like(values))
    return advantages, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Return ``x`` normalised to unit variance (and zero mean unless ``shift_mean=False``) over ``mask``.

    Mean and Bessel-corrected variance are taken over the masked entries only; masked-out entries
    come back as 0. Not shifting the mean keeps the sign of e.g. rewards.
    """
    mask = mask.bool()
    mean = masked_mean(x, mask)
    count = mask.sum()
    if count < 2:
        raise ValueError("whiten needs at least 2 masked entries for a Bessel-corrected variance")
    variance = (torch.where(mask, (x - mean) ** 2, torch.zeros_like(x))).sum() / (count - 1)
    whitened = (x - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros_like(whitened))


def ppo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
    cliprange_value: float = 0.2,
    vf_coef: float = 0.1,
    reduction: Reduction = "mean",
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Return ``(loss, metrics)``: clipped policy loss + vf_coef * clipped value loss over ``mask``.

    All inputs [B, T]. ``old_logps``/``old_values`` come from the rollout; ``advantages`` (usually
    whitened) and ``returns`` from ``gae``. pg = mean max(-A rho, -A clip(rho, 1 +- cliprange));
    vf = 0.5 mean max((V - R)^2, (clip(V, V_old +- cliprange_value) - R)^2).
    ``is_weights`` [B, T] (detached truncated importance weights, when another engine sampled the
    rollout) multiply the policy term per token.
    ``reduction="sum"`` returns the token sum of pg_t + vf_coef vf_t instead (units: masked tokens);
    the metrics stay token means.
    Metrics: ``loss/policy``, ``loss/value``, ``loss/total``, ``policy/approxkl``,
    ``policy/clipfrac``, ``value/clipfrac``.
    """
    check_reduction(reduction)
    mask = mask.bool()
    advantages = advantages.detach()
    returns = returns.detach()
    old_values = old_values.detach()

    log_ratio = logps - old_logps.detach()
    ratio = torch.exp(log_ratio)
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    pg_per_token = torch.maximum(pg_unclipped, pg_clipped)
    if is_weights is not None:
        pg_per_token = pg_per_token * is_weights.detach()
    policy_loss = masked_mean(pg_per_token, mask)

    values_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    vf_unclipped = (values - returns) ** 2
    vf_clipped = (values_clipped - returns) ** 2
    vf_per_token = 0.5 * torch.maximum(vf_unclipped, vf_clipped)
    value_loss = masked_mean(vf_per_token, mask)

    loss = policy_loss + vf_coef * value_loss
    if reduction == "sum":
        loss_to_return = masked_sum(pg_per_token + vf_coef * vf_per_token, mask)
    else:
        loss_to_return = loss
    with torch.no_grad():
        metrics: Metrics = {
            "loss/policy": policy_loss.detach(),
            "loss/value": value_loss.detach(),
            "loss/total": loss.detach(),
            "policy/approxkl": 0.5 * masked_mean(log_ratio.detach() ** 2, mask),
            "policy/clipfrac": masked_mean((pg_clipped > pg_unclipped).float(), mask),
            "value/clipfrac": masked_mean((vf_clipped > vf_unclipped).float(), mask),
        }
    return loss_to_return, metrics
