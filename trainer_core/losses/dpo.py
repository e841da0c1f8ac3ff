"""Direct Preference Optimisation losses from per-sequence log-probs.

Formulas (written from the papers, not from any library):
- sigmoid DPO, Rafailov et al. 2023 (arXiv 2305.18290) eq. 7: loss = -log sigma(beta * Delta),
  Delta = (logp_c - ref_logp_c) - (logp_r - ref_logp_r).
- cDPO (conservative DPO, label smoothing eps; Mitchell 2023 note "A note on DPO with noisy
  preferences"): loss = -(1 - eps) log sigma(beta * Delta) - eps log sigma(-beta * Delta).
- IPO, Azar et al. 2023 (arXiv 2310.12036) eq. 17: loss = (Delta - 1 / (2 beta))^2. The paper uses
  log-probs averaged over tokens; pass averaged log-probs if you want that behaviour.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from trainer_core.losses.common import Metrics, Reduction, check_reduction

DpoLossType = Literal["sigmoid", "ipo"]
DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: DpoLossType = "sigmoid",
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, Metrics]:
    """Return ``(loss, metrics)``: the DPO loss averaged over preference pairs.

    All inputs are [B] per-sequence sums of completion-token log-probs. Reference log-probs carry no
    gradient (they are detached here in case the caller forgot). ``reduction="sum"`` sums over pairs.
    Metrics: ``rewards/chosen``, ``rewards/rejected`` (mean implicit rewards beta * (logp - ref)),
    ``rewards/accuracies`` (fraction of pairs with chosen reward > rejected reward),
    ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (mean policy log-probs).
    """
    check_reduction(reduction)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("label_smoothing applies to loss_type='sigmoid' only (cDPO); IPO has none")

    chosen_logratio = policy_chosen_logps - ref_chosen_logps.detach()
    rejected_logratio = policy_rejected_logps - ref_rejected_logps.detach()
    delta = chosen_logratio - rejected_logratio

    if loss_type == "sigmoid":
        # logsigmoid is the stable form of log(sigma(x)) for large |x|.
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(
            -beta * delta
        )
    else:
        losses = (delta - 1 / (2 * beta)) ** 2

    with torch.no_grad():
        chosen_rewards = beta * chosen_logratio
        rejected_rewards = beta * rejected_logratio
        metrics: Metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": policy_chosen_logps.detach().mean(),
            "logps/rejected": policy_rejected_logps.detach().mean(),
        }
    return (losses.mean() if reduction == "mean" else losses.sum()), metrics
