"""Supervised fine-tuning loss: mean token cross-entropy over the loss-mask tokens.

Labels are already aligned to logits: ``labels[..., t]`` is the target for ``logits[..., t, :]``
(the caller shifts; see ``trainer_core.losses.common``). ``-100`` marks tokens with no loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer_core.losses.chunked import Project, chunked_token_ce, fused_linear_ce_sum
from trainer_core.losses.common import IGNORE_INDEX, Metrics, Reduction, check_reduction


def _token_ce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    reduction: Reduction,
    num_tokens_in_batch: int | torch.Tensor | None,
) -> tuple[torch.Tensor, Metrics]:
    """Return ``(loss, metrics)`` for flat ``logits`` [N, V] and ``labels`` [N]."""
    mask = labels != ignore_index
    num_tokens = mask.sum()
    # Float32 for the softmax: bf16 logits lose the small probabilities CE depends on.
    ce_sum = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    # Dividing the sum by an explicit count (instead of reduction="mean") keeps an empty mask at 0
    # instead of NaN.
    if num_tokens_in_batch is not None:
        loss = ce_sum / num_tokens_in_batch
    else:
        loss = ce_sum / num_tokens.clamp(min=1) if reduction == "mean" else ce_sum
    with torch.no_grad():
        correct = ((logits.argmax(dim=-1) == labels) & mask).sum()
        metrics: Metrics = {
            "loss": ce_sum.detach() / num_tokens.clamp(min=1),
            "mean_token_accuracy": correct.float() / num_tokens.clamp(min=1),
            "num_tokens": num_tokens,
        }
    return loss, metrics


def sft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: Reduction = "mean",
    num_tokens_in_batch: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Return ``(loss, metrics)``: mean cross-entropy over tokens whose label is not ``ignore_index``.

    ``logits``: [..., V]; ``labels``: [...] aligned to the logits (already shifted).
    ``reduction="sum"`` returns the summed CE instead (units: ``num_tokens``), for a loop that
    divides the accumulated gradient by the step's token count. ``num_tokens_in_batch``, when given,
    divides the summed CE by that count instead (e.g. the whole step's tokens; 1 equals "sum").
    Metrics: ``loss`` (this call's mean CE), ``mean_token_accuracy``, ``num_tokens``.
    """
    check_reduction(reduction)
    vocab = logits.shape[-1]
    return _token_ce(
        logits.reshape(-1, vocab), labels.reshape(-1), ignore_index, reduction, num_tokens_in_batch
    )


def sft_loss_from_hidden(
    hidden: torch.Tensor,
    head: Project,
    labels: torch.Tensor,
    *,
    vocab: int,
    ignore_index: int = IGNORE_INDEX,
    reduction: Reduction = "mean",
    num_tokens_in_batch: int | torch.Tensor | None = None,
    head_weight: torch.Tensor | None = None,
    rows: int | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Return ``(loss, metrics)`` as ``sft_loss`` would, never holding more than a chunk of logits.

    ``hidden``: [N, H] (or [B, T, H]) final hidden states aligned to ``labels`` [N] (or [B, T]);
    ``head`` maps hidden rows to ``vocab`` logits (the LM head, maybe LoRA-wrapped). Only rows whose
    label is not ``ignore_index`` are projected, a chunk at a time (``trainer_core.losses.chunked``).
    ``head_weight``: the head's weight when it is a plain bias-free linear layer; on CUDA with
    liger-kernel installed the cross-entropy then runs in its fused linear kernel.
    Valid only for a head with no logit soft-capping or scaling after it.
    """
    check_reduction(reduction)
    flat_labels = labels.reshape(-1)
    keep = flat_labels != ignore_index
    selected = hidden.reshape(-1, hidden.shape[-1])[keep]
    targets = flat_labels[keep]
    ce_sum = fused_linear_ce_sum(selected, head_weight, targets) if head_weight is not None else None
    if ce_sum is None:
        ce, correct = chunked_token_ce(selected, head, targets, vocab, rows)
        ce_sum = ce.sum()
    else:
        with torch.no_grad():
            _, correct = chunked_token_ce(selected, head, targets, vocab, rows)
    num_tokens = keep.sum()
    if num_tokens_in_batch is not None:
        loss = ce_sum / num_tokens_in_batch
    else:
        loss = ce_sum / num_tokens.clamp(min=1) if reduction == "mean" else ce_sum
    metrics: Metrics = {
        "loss": ce_sum.detach() / num_tokens.clamp(min=1),
        "mean_token_accuracy": correct.sum().float() / num_tokens.clamp(min=1),
        "num_tokens": num_tokens,
    }
    return loss, metrics
