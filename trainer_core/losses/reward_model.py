"""Bradley-Terry loss of a reward model on preference pairs (Ouyang et al. 2022, eq. 1).

loss = -log sigma(r_chosen - r_rejected): the negative log-likelihood that the chosen answer wins
under the Bradley-Terry model, with r the scalar scores of the two sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer_core.losses.common import Metrics, Reduction, check_reduction


def bradley_terry_loss(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, reduction: Reduction = "mean"
) -> tuple[torch.Tensor, Metrics]:
    """Return ``(loss, metrics)`` over [B] pair scores; ``reduction="sum"`` sums over pairs.

    Metrics: ``accuracy`` (fraction of pairs scored chosen > rejected), ``margin`` (mean
    r_chosen - r_rejected), ``rewards/chosen`` and ``rewards/rejected`` (mean scores).
    """
    check_reduction(reduction)
    if chosen_scores.shape != rejected_scores.shape or chosen_scores.dim() != 1:
        raise ValueError(f"expected two [B] score tensors, got {tuple(chosen_scores.shape)} and "
                         f"{tuple(rejected_scores.shape)}")
    difference = chosen_scores.float() - rejected_scores.float()
    losses = -F.logsigmoid(difference)
    with torch.no_grad():
        metrics: Metrics = {
            "accuracy": (difference > 0).float().mean(),
            "margin": difference.mean(),
            "rewards/chosen": chosen_scores.detach().float().mean(),
            "rewards/rejected": rejected_scores.detach().float().mean(),
        }
    return (losses.mean() if reduction == "mean" else losses.sum()), metrics
