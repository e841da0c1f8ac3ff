"""Structured Agent Distillation (arXiv 2505.13820): span-weighted teacher-student divergence.

A trajectory's tokens fall into reasoning spans (mask m_r), action spans (mask m_a, including the
final answer) and everything else (observations, prompt, padding), which carries no loss. The loss
is lambda_r L_reason + lambda_a L_action, each L the mean per-token divergence over its span.
The paper's exact weights and KL direction were not verified, so both are parameters (defaults
lambda_r = lambda_a = 1, forward KL).

Only loss-carrying positions are gathered before any softmax, so observation tokens cost no
full-vocabulary work and cannot influence the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from trainer_core.losses import divergences
from trainer_core.losses.chunked import Project, map_logit_chunks
from trainer_core.losses.common import IGNORE_INDEX, Metrics

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "symmetric_kl", "alpha", "ce"]
DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "symmetric_kl", "alpha", "ce")
SpanWeighting = Literal["uniform", "span_type", "confidence", "scheduled"]
SPAN_WEIGHTINGS: tuple[str, ...] = ("uniform", "span_type", "confidence", "scheduled")
# Largest log-mass the top-k may claim before the tail bucket is floored (tail >= ~1e-6): top-k
# log-probs from a server often sum to slightly above 1 after rounding.
_MAX_TOPK_LOG_MASS = -1e-6


@dataclass(frozen=True)
class DenseTeacher:
    """A full teacher distribution: ``logits`` [B, T, V] (raw logits or log-probs; both work)."""

    logits: torch.Tensor


@dataclass(frozen=True)
class SparseTeacher:
    """The teacher's top-k: ``token_ids`` [B, T, K] (valid vocabulary ids) and their ``logprobs``
    [B, T, K] under the teacher's full distribution at temperature 1 (e.g. SGLang top_logprobs)."""

    token_ids: torch.Tensor
    logprobs: torch.Tensor


Teacher = DenseTeacher | SparseTeacher


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """Return log(1 - exp(x)) for x < 0, with x floored away from 0 so the result stays finite."""
    return torch.log(-torch.expm1(x.clamp(max=_MAX_TOPK_LOG_MASS)))


def _aligned_logps(
    student_logits: torch.Tensor, teacher: Teacher, temperature: float, tail_bucket: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(student_logp, teacher_logp)`` [N, C] normalised over one shared support."""
    if isinstance(teacher, DenseTeacher):
        student_logp = torch.log_softmax(student_logits.float() / temperature, dim=-1)
        teacher_logp = torch.log_softmax(teacher.logits.float() / temperature, dim=-1)
        return student_logp, teacher_logp
    ids = teacher.token_ids.long()
    teacher_topk = teacher.logprobs.float()
    if not tail_bucket:
        # Renormalising over the k ids is exact for any temperature: softmax of the gathered
        # logits / tau is the tempered distribution conditioned on the top-k set.
        student_logp = torch.log_softmax(student_logits.float().gather(-1, ids) / temperature, dim=-1)
        return student_logp, torch.log_softmax(teacher_topk / temperature, dim=-1)
    student_topk = torch.log_softmax(student_logits.float(), dim=-1).gather(-1, ids)
    student_tail = _log1mexp(torch.logsumexp(student_topk, dim=-1, keepdim=True))
    teacher_tail = _log1mexp(torch.logsumexp(teacher_topk, dim=-1, keepdim=True))
    return torch.cat([student_topk, student_tail], dim=-1), torch.cat([teacher_topk, teacher_tail], dim=-1)


def _divergence(
    name: str, student_logp: torch.Tensor, teacher_logp: torch.Tensor, jsd_beta: float, alpha: float
) -> torch.Tensor:
    """Return the per-position divergence ``name`` between aligned student and teacher log-probs."""
    if name == "forward_kl":
        return divergences.forward_kl(student_logp, teacher_logp)
    if name == "reverse_kl":
        return divergences.reverse_kl(student_logp, teacher_logp)
    if name == "jsd":
        return divergences.generalized_jsd(student_logp, teacher_logp, jsd_beta)
    if name == "symmetric_kl":
        return divergences.symmetric_kl(student_logp, teacher_logp)
    return divergences.alpha_divergence(student_logp, teacher_logp, alpha)


def _validate(
    positions: torch.Size,
    vocab: int,
    reasoning_mask: torch.Tensor,
    action_mask: torch.Tensor,
    teacher: Teacher | None,
    labels: torch.Tensor | None,
    divergence: str,
    weighting: str,
    temperature: float,
    tail_bucket: bool,
    progress: float,
) -> None:
    """Raise ValueError naming the first inconsistent argument of ``sad_loss``."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if weighting not in SPAN_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {SPAN_WEIGHTINGS}, got {weighting!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reasoning_mask.shape != positions or action_mask.shape != positions:
        raise ValueError(
            f"reasoning_mask {tuple(reasoning_mask.shape)} and action_mask {tuple(action_mask.shape)} "
            f"must match student_logits positions {tuple(positions)}"
        )
    if isinstance(teacher, DenseTeacher) and teacher.logits.shape != (*positions, vocab):
        raise ValueError(
            f"dense teacher logits {tuple(teacher.logits.shape)} must match student logits "
            f"{(*positions, vocab)} (same positions and vocabulary)"
        )
    if isinstance(teacher, SparseTeacher) and (
        teacher.token_ids.shape != teacher.logprobs.shape or teacher.token_ids.shape[:-1] != positions
    ):
        raise ValueError(
            f"sparse teacher token_ids {tuple(teacher.token_ids.shape)} and logprobs "
            f"{tuple(teacher.logprobs.shape)} must both be [B, T, K] with [B, T] = {tuple(positions)}"
        )
    if (reasoning_mask.bool() & action_mask.bool()).any():
        raise ValueError("reasoning_mask and action_mask overlap: a token belongs to one span type")
    if divergence == "ce":
        if labels is None or labels.shape != positions:
            raise ValueError("divergence='ce' needs labels (the teacher's tokens) shaped like the masks")
    elif teacher is None:
        raise ValueError(f"divergence={divergence!r} needs a teacher distribution; use 'ce' without one")
    if weighting == "confidence" and teacher is None:
        raise ValueError("weighting='confidence' needs a teacher distribution")
    if isinstance(teacher, SparseTeacher) and tail_bucket and temperature != 1.0:
        raise ValueError(
            "a sparse teacher with tail_bucket=True supports temperature 1.0 only (the tail's tempered "
            "mass is unknown); use tail_bucket=False to renormalise over the top-k instead"
        )
    if weighting == "scheduled" and not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress}")


def sad_loss(
    student_logits: torch.Tensor,
    reasoning_mask: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    teacher: Teacher | None = None,
    labels: torch.Tensor | None = None,
    divergence: Divergence = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    alpha: float = 0.5,
    tail_bucket: bool = True,
    weighting: SpanWeighting = "span_type",
    reasoning_weight: float = 1.0,
    action_weight: float = 1.0,
    reasoning_weight_end: float | None = None,
    action_weight_end: float | None = None,
    progress: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, Metrics]:
    """Return ``(loss, metrics)``: span-weighted divergence between teacher and student on span tokens.

    ``student_logits`` [B, T, V]; ``reasoning_mask``, ``action_mask`` [B, T] disjoint bools, aligned
    to the logits like labels (position t scores the token predicted at t). ``teacher`` is a
    ``DenseTeacher`` or ``SparseTeacher`` on the same positions; ``labels`` [B, T] are the teacher's
    tokens, used by ``divergence='ce'`` (cross-entropy, no teacher distribution; positions whose
    label is ``ignore_index`` are dropped from the spans).

    Sparse teacher: student log-probs are gathered at the teacher's top-k ids; with ``tail_bucket``
    both get a (k+1)-th category log(1 - sum exp(top-k)), otherwise both are renormalised over k.

    Divergences (per token, see ``divergences``): forward_kl KL(T||S), reverse_kl KL(S||T), jsd
    (generalised, ``jsd_beta``; 0 = forward, 1 = reverse), symmetric_kl (mean of both KLs), alpha
    (Amari, ``alpha`` in (0, 1)), ce. Temperature tau divides both logits and the divergence is
    multiplied by tau^2 (Hinton et al. 2015) so gradients keep their scale; ce ignores tau.

    Weighting, with L_s = mean over span s tokens of (c_t * d_t):
    - uniform: mean of d_t over all reasoning and action tokens (span types ignored, c = 1);
    - span_type: reasoning_weight * L_r + action_weight * L_a (c = 1);
    - confidence: as span_type with c_t = 1 - H(teacher_t) / log(support size) (detached);
    - scheduled: as span_type with each weight moved linearly from its start value to its ``*_end``
      value (default: unchanged) as ``progress`` goes 0 -> 1.

    The loss is a mean over this call's tokens (per span), not a sum: under a loop that sums units,
    count one call as one unit (or scale by its loss-token count to weigh calls by tokens).

    Metrics: ``loss/reasoning``, ``loss/action`` (L_r, L_a before the span weights),
    ``tokens/reasoning``, ``tokens/action``, and when a teacher is given ``kl/reasoning``,
    ``kl/action`` (mean forward KL(T||S) at the loss temperature, without tau^2: a diagnostic that
    is comparable whatever divergence is trained).
    """
    _validate(
        student_logits.shape[:-1], student_logits.shape[-1], reasoning_mask, action_mask, teacher, labels,
        divergence, weighting, temperature, tail_bucket, progress,
    )
    spans = _Spans.of(reasoning_mask, action_mask, labels if divergence == "ce" else None, ignore_index)
    terms = _token_terms(
        student_logits[spans.positions], _select(teacher, spans.positions),
        None if labels is None else labels[spans.positions],
        divergence=divergence, temperature=temperature, jsd_beta=jsd_beta, alpha=alpha,
        tail_bucket=tail_bucket, weighting=weighting,
    )
    return _reduce(spans, *terms, teacher is not None, weighting=weighting, reasoning_weight=reasoning_weight,
                   action_weight=action_weight, reasoning_weight_end=reasoning_weight_end,
                   action_weight_end=action_weight_end, progress=progress)


def sad_loss_from_hidden(
    hidden: torch.Tensor,
    head: Project,
    vocab: int,
    reasoning_mask: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    teacher: Teacher | None = None,
    labels: torch.Tensor | None = None,
    divergence: Divergence = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    alpha: float = 0.5,
    tail_bucket: bool = True,
    weighting: SpanWeighting = "span_type",
    reasoning_weight: float = 1.0,
    action_weight: float = 1.0,
    reasoning_weight_end: float | None = None,
    action_weight_end: float | None = None,
    progress: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
    rows: int | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Return ``sad_loss``'s ``(loss, metrics)`` for the student logits ``head(hidden)``, a chunk at a time.

    ``hidden`` [B, T, H]: the student's last hidden states; ``head`` maps them to ``vocab`` logits.
    Only span positions are projected, ``rows`` positions at a time
    (``trainer_core.losses.chunked``), so no [tokens x vocab] tensor is ever held whole.
    """
    _validate(
        hidden.shape[:-1], vocab, reasoning_mask, action_mask, teacher, labels,
        divergence, weighting, temperature, tail_bucket, progress,
    )
    spans = _Spans.of(reasoning_mask, action_mask, labels if divergence == "ce" else None, ignore_index)
    selected_teacher = _select(teacher, spans.positions)
    selected_labels = None if labels is None else labels[spans.positions]

    def fn(logits: torch.Tensor, where: slice) -> tuple[torch.Tensor, ...]:
        return _token_terms(
            logits, _select(selected_teacher, where),
            None if selected_labels is None else selected_labels[where],
            divergence=divergence, temperature=temperature, jsd_beta=jsd_beta, alpha=alpha,
            tail_bucket=tail_bucket, weighting=weighting,
        )

    terms = map_logit_chunks(hidden[spans.positions], head, fn, vocab, rows)
    return _reduce(spans, *terms, teacher is not None, weighting=weighting, reasoning_weight=reasoning_weight,
                   action_weight=action_weight, reasoning_weight_end=reasoning_weight_end,
                   action_weight_end=action_weight_end, progress=progress)


@dataclass(frozen=True)
class _Spans:
    """The loss positions [B, T] and, over them, which are reasoning and which action tokens."""

    positions: torch.Tensor
    is_reasoning: torch.Tensor
    is_action: torch.Tensor

    @classmethod
    def of(
        cls, reasoning_mask: torch.Tensor, action_mask: torch.Tensor, labels: torch.Tensor | None,
        ignore_index: int,
    ) -> _Spans:
        reasoning_mask, action_mask = reasoning_mask.bool(), action_mask.bool()
        if labels is not None:
            # Cross-entropy needs a label: positions without one drop out of the spans.
            has_label = labels != ignore_index
            reasoning_mask, action_mask = reasoning_mask & has_label, action_mask & has_label
        positions = reasoning_mask | action_mask
        return cls(positions, reasoning_mask[positions], action_mask[positions])


def _select(teacher: Teacher | None, where: torch.Tensor | slice) -> Teacher | None:
    """Returns the teacher at the positions ``where`` selects (a [B, T] mask or a row slice)."""
    if teacher is None:
        return None
    if isinstance(teacher, DenseTeacher):
        return DenseTeacher(teacher.logits[where])
    return SparseTeacher(teacher.token_ids[where], teacher.logprobs[where])



def _token_terms(
    student: torch.Tensor,
    teacher: Teacher | None,
    labels: torch.Tensor | None,
    *,
    divergence: str,
    temperature: float,
    jsd_beta: float,
    alpha: float,
    tail_bucket: bool,
    weighting: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns per-position ``(loss term, forward KL (detached; 0 without teacher), confidence)``.

    ``student`` [N, V] logits at loss positions; ``teacher`` and ``labels`` at the same positions.
    """
    kl_per_token = torch.zeros(student.shape[0], device=student.device)
    confidence = torch.ones(student.shape[0], device=student.device)
    if teacher is not None:
        student_logp, teacher_logp = _aligned_logps(student, teacher, temperature, tail_bucket)
        teacher_logp = teacher_logp.detach()
        with torch.no_grad():
            kl_per_token = divergences.forward_kl(student_logp.detach(), teacher_logp)
            if weighting == "confidence":
                support = teacher_logp.shape[-1]
                if support > 1:
                    confidence = 1 - divergences.entropy(teacher_logp) / math.log(support)
    if divergence == "ce":
        assert labels is not None
        student_all = torch.log_softmax(student.float(), dim=-1)
        per_token = -student_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    else:
        per_token = temperature**2 * _divergence(divergence, student_logp, teacher_logp, jsd_beta, alpha)
    return per_token, kl_per_token, confidence


def _reduce(
    spans: _Spans,
    per_token: torch.Tensor,
    kl_per_token: torch.Tensor,
    confidence: torch.Tensor,
    has_teacher: bool,
    *,
    weighting: str,
    reasoning_weight: float,
    action_weight: float,
    reasoning_weight_end: float | None,
    action_weight_end: float | None,
    progress: float,
) -> tuple[torch.Tensor, Metrics]:
    """Returns the span-weighted loss and its metrics from the per-position terms."""
    is_reasoning, is_action = spans.is_reasoning, spans.is_action
    weighted = confidence * per_token
    reasoning_tokens = is_reasoning.sum()
    action_tokens = is_action.sum()
    reasoning_term = weighted[is_reasoning].sum() / reasoning_tokens.clamp(min=1)
    action_term = weighted[is_action].sum() / action_tokens.clamp(min=1)

    if weighting == "uniform":
        # Sum over an empty selection is 0 with a graph, so an all-observation batch still backprops.
        loss = per_token.sum() / spans.positions.sum().clamp(min=1)
    else:
        lambda_r, lambda_a = reasoning_weight, action_weight
        if weighting == "scheduled":
            end_r = reasoning_weight if reasoning_weight_end is None else reasoning_weight_end
            end_a = action_weight if action_weight_end is None else action_weight_end
            lambda_r = reasoning_weight + progress * (end_r - reasoning_weight)
            lambda_a = action_weight + progress * (end_a - action_weight)
        loss = lambda_r * reasoning_term + lambda_a * action_term

    with torch.no_grad():
        metrics: Metrics = {
            "loss/reasoning": reasoning_term.detach(),
            "loss/action": action_term.detach(),
            "tokens/reasoning": reasoning_tokens,
            "tokens/action": action_tokens,
        }
        if has_teacher:
            metrics["kl/reasoning"] = kl_per_token[is_reasoning].sum() / reasoning_tokens.clamp(min=1)
            metrics["kl/action"] = kl_per_token[is_action].sum() / action_tokens.clamp(min=1)
    return loss, metrics
