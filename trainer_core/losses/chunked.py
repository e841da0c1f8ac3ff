"""Per-token reductions of the LM head's output computed a chunk of positions at a time.

With a 151,936-token vocabulary one 4k-token row has 2.4 GB of fp32 logits, and autograd keeps
them (and their softmax) for the backward pass. Here the head is applied to ``rows`` positions at
a time and each chunk is reduced at once to per-token numbers (cross-entropy, log-prob, entropy,
a divergence); under autograd each chunk runs inside a non-reentrant activation checkpoint, so
only the chunk's inputs are kept and its logits are recomputed, one chunk at a time, in the
backward pass. Peak logits memory is one chunk's, whatever the number of tokens; the result and
its gradients are those of the plain path up to float summation order.

When every position fits in one chunk (small vocabularies, short batches) the plain path runs:
no recomputation cost where there is no memory to save.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from trainer_core.losses.common import IGNORE_INDEX

# fp32 logits per chunk: 2**25 elements = 128 MiB (about 220 rows at a 151,936-token vocabulary).
CHUNK_ELEMENTS = 1 << 25

Project = Callable[[torch.Tensor], torch.Tensor]
ChunkFn = Callable[[torch.Tensor, slice], tuple[torch.Tensor, ...]]


def chunk_rows(vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Returns how many positions' logits fit in a chunk of ``elements`` values."""
    return max(1, elements // max(vocab, 1))


def map_logit_chunks(
    hidden: torch.Tensor, project: Project, fn: ChunkFn, vocab: int, rows: int | None = None
) -> tuple[torch.Tensor, ...]:
    """Returns ``fn``'s per-row outputs over all of ``hidden`` [N, H], concatenated along rows.

    ``project`` maps hidden rows to logits (the LM head); ``fn(logits, rows_slice)`` reduces one
    chunk's logits [n, V] to per-row tensors (it slices its own per-row inputs, e.g. labels, with
    ``rows_slice``). ``rows`` defaults to ``chunk_rows(vocab)``.
    """
    count = hidden.shape[0]
    size = rows or chunk_rows(vocab)
    if count <= size:
        return fn(project(hidden), slice(0, count))
    parts: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, count, size):
        where = slice(start, min(count, start + size))

        def chunk(h: torch.Tensor, where: slice = where) -> tuple[torch.Tensor, ...]:
            return fn(project(h), where)

        if torch.is_grad_enabled():
            parts.append(checkpoint(chunk, hidden[where], use_reentrant=False))
        else:
            parts.append(chunk(hidden[where]))
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))


def _safe(labels: torch.Tensor) -> torch.Tensor:
    return torch.where(labels == IGNORE_INDEX, torch.zeros_like(labels), labels)


def chunked_token_ce(
    hidden: torch.Tensor, project: Project, labels: torch.Tensor, vocab: int, rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(ce, correct)`` [N]: each row's cross-entropy of its label and whether argmax hits it.

    Rows whose label is ``IGNORE_INDEX`` get 0 and False. Softmax in float32.
    """

    def fn(logits: torch.Tensor, where: slice) -> tuple[torch.Tensor, torch.Tensor]:
        target = labels[where]
        logits32 = logits.float()
        ce = torch.logsumexp(logits32, -1) - logits32.gather(-1, _safe(target).unsqueeze(-1)).squeeze(-1)
        keep = target != IGNORE_INDEX
        correct = (logits32.detach().argmax(-1) == target) & keep
        return torch.where(keep, ce, torch.zeros_like(ce)), correct

    ce, correct = map_logit_chunks(hidden, project, fn, vocab, rows)
    return ce, correct


def chunked_token_logps(
    hidden: torch.Tensor,
    project: Project,
    labels: torch.Tensor,
    vocab: int,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns ``(logps, entropy)`` [N]: log p(label) under softmax(logits / temperature), 0 where ignored.

    ``entropy`` (detached, nats, of the same tempered distribution) only when ``with_entropy``.
    """

    def fn(logits: torch.Tensor, where: slice) -> tuple[torch.Tensor, ...]:
        target = labels[where]
        scaled = logits.float() / temperature
        lse = torch.logsumexp(scaled, -1)
        logp = scaled.gather(-1, _safe(target).unsqueeze(-1)).squeeze(-1) - lse
        logp = torch.where(target != IGNORE_INDEX, logp, torch.zeros_like(logp))
        if not with_entropy:
            return (logp,)
        with torch.no_grad():
            log_probs = scaled.detach() - lse.detach().unsqueeze(-1)
            entropy = -(log_probs.exp() * log_probs).sum(-1)
        return logp, entropy

    out = map_logit_chunks(hidden, project, fn, vocab, rows)
    return out[0], (out[1] if with_entropy else None)


def fused_linear_ce_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor | None:
    """Returns the summed cross-entropy of ``hidden @ weight.T`` through liger-kernel's fused kernel.

    None where that kernel cannot run (not CUDA, or liger-kernel not installed): callers fall back
    to ``chunked_token_ce``. Liger's Triton kernel projects and reduces in chunks and writes the
    input gradient during the forward pass (https://github.com/linkedin/Liger-Kernel).
    """
    if not hidden.is_cuda:
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    out = loss_fn(weight, hidden.to(weight.dtype), labels)
    # Newer releases return a named tuple when extra outputs are requested; the loss comes first.
    return out if isinstance(out, torch.Tensor) else out[0]
