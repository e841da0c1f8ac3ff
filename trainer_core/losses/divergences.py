"""Per-position divergences between a teacher and a student given as log-probabilities.

Every function takes ``student_logp`` and ``teacher_logp`` of the same shape [..., C] (normalised
log-probabilities over the same C categories: a vocabulary, or top-k ids plus a tail bucket) and
returns [...] (one value per position, in nats). Zero-probability categories contribute 0, so a
teacher that gives -inf log-prob somewhere yields neither NaN values nor NaN gradients.
"""

from __future__ import annotations

import math

import torch


def kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """Return KL(p || q) = sum p (log p - log q) over the last dimension."""
    p = p_logp.exp()
    support = p > 0
    # Replace log-probs off p's support by 0 before subtracting: -inf - -inf would give NaN
    # gradients even though torch.where discards the value.
    safe_p_logp = torch.where(support, p_logp, torch.zeros_like(p_logp))
    safe_q_logp = torch.where(support, q_logp, torch.zeros_like(q_logp))
    terms = torch.where(support, p * (safe_p_logp - safe_q_logp), torch.zeros_like(p))
    return terms.sum(dim=-1)


def forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Return KL(teacher || student) = sum p_T (log p_T - log p_S): mass-covering (Hinton et al. 2015)."""
    return kl(teacher_logp, student_logp)


def reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Return KL(student || teacher) = sum p_S (log p_S - log p_T): mode-seeking (Gu et al. 2024, MiniLLM)."""
    return kl(student_logp, teacher_logp)


def symmetric_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Return (KL(T || S) + KL(S || T)) / 2: half the Jeffreys divergence, on the same scale as one KL."""
    return 0.5 * (forward_kl(student_logp, teacher_logp) + reverse_kl(student_logp, teacher_logp))


def generalized_jsd(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.5
) -> torch.Tensor:
    """Return JSD_beta = beta KL(T || M) + (1 - beta) KL(S || M), M = beta T + (1 - beta) S.

    Definition of Agarwal et al. 2024 (GKD, arXiv 2306.13649). The formula itself tends to
    0 at both ends, but JSD_beta / beta -> KL(T || S) as beta -> 0 and JSD_beta / (1 - beta) ->
    KL(S || T) as beta -> 1; by the same convention as GKD, beta = 0 returns forward KL and beta = 1
    reverse KL.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logp, teacher_logp)
    if beta == 1.0:
        return reverse_kl(student_logp, teacher_logp)
    mixture_logp = torch.logsumexp(
        torch.stack([teacher_logp + math.log(beta), student_logp + math.log(1 - beta)]), dim=0
    )
    return beta * kl(teacher_logp, mixture_logp) + (1 - beta) * kl(student_logp, mixture_logp)


def alpha_divergence(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, alpha: float = 0.5
) -> torch.Tensor:
    """Return Amari's alpha-divergence D_alpha(T || S) = (1 - sum p_T^a p_S^(1-a)) / (a (1 - a)).

    Amari's alpha-family as written by Cichocki & Amari 2010, "Families of Alpha- Beta- and
    Gamma-Divergences" (Entropy 12(6)), reduced for normalised distributions, alpha in (0, 1).
    alpha -> 1 tends to KL(T || S) (forward), alpha -> 0 to KL(S || T) (reverse); alpha = 0.5 is
    4 (1 - Bhattacharyya coefficient).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    log_overlap = torch.logsumexp(alpha * teacher_logp + (1 - alpha) * student_logp, dim=-1)
    # -expm1 keeps precision when the distributions nearly agree (overlap close to 1).
    return -torch.expm1(log_overlap) / (alpha * (1 - alpha))


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """Return the entropy -sum p log p over the last dimension (0-probability terms count 0)."""
    p = logp.exp()
    safe_logp = torch.where(p > 0, logp, torch.zeros_like(logp))
    return -(p * safe_logp).sum(dim=-1)
