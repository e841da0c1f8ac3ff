"""Chunked LM-head reductions: the same losses and gradients as the full-logits path, to 1e-5.

Each test forces several chunks (``rows`` far below the position count) and compares the loss and
the gradients of the hidden states and of the head against the plain path on full logits.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer_core.losses import DenseTeacher, SparseTeacher, sad_loss, sft_loss, token_entropy, token_logps
from trainer_core.losses.chunked import chunked_token_logps, map_logit_chunks
from trainer_core.losses.sad import sad_loss_from_hidden
from trainer_core.losses.sft import sft_loss_from_hidden

VOCAB, HIDDEN = 37, 8


def _setup(seed: int = 0) -> tuple[torch.Tensor, nn.Linear, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 11, HIDDEN, generator=generator, dtype=torch.float64).float().requires_grad_()
    head = nn.Linear(HIDDEN, VOCAB, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=generator))
    labels = torch.randint(0, VOCAB, (3, 11), generator=generator)
    labels[:, :3] = -100
    labels[1, 7:] = -100
    return hidden, head, labels


def _grads(loss: torch.Tensor, hidden: torch.Tensor, head: nn.Linear) -> list[torch.Tensor]:
    return [g.clone() for g in torch.autograd.grad(loss, [hidden, head.weight])]


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_chunked_sft_loss_and_gradients_equal_the_full_logits_path() -> None:
    hidden, head, labels = _setup()
    full, full_metrics = sft_loss(head(hidden), labels)
    chunked, metrics = sft_loss_from_hidden(hidden, head, labels, vocab=VOCAB, rows=4)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    assert float(metrics["mean_token_accuracy"]) == pytest.approx(float(full_metrics["mean_token_accuracy"]))
    _assert_same(_grads(chunked, hidden, head), _grads(full, hidden, head))


def test_chunked_logps_and_entropy_equal_the_full_logits_path() -> None:
    hidden, head, labels = _setup(1)
    keep = labels != -100
    full_logps, _ = token_logps(head(hidden) / 0.7, labels)
    logps, entropy = chunked_token_logps(hidden[keep], head, labels[keep], VOCAB, temperature=0.7,
                                         with_entropy=True, rows=5)
    torch.testing.assert_close(logps, full_logps[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, token_entropy(head(hidden) / 0.7)[keep], rtol=1e-5, atol=1e-5)
    _assert_same(_grads(logps.sum(), hidden, head), _grads(full_logps.sum(), hidden, head))


@pytest.mark.parametrize("kind", ["sparse_forward_kl", "dense_jsd", "ce"])
def test_chunked_sad_loss_and_gradients_equal_the_full_logits_path(kind: str) -> None:
    hidden, head, labels = _setup(2)
    generator = torch.Generator().manual_seed(3)
    reasoning = torch.rand(3, 11, generator=generator) < 0.4
    action = ~reasoning & (torch.rand(3, 11, generator=generator) < 0.5)
    kwargs: dict = {"divergence": "ce", "labels": labels.clamp(min=0)}
    if kind == "sparse_forward_kl":
        ids = torch.stack([torch.randperm(VOCAB, generator=generator)[:5] for _ in range(33)]).view(3, 11, 5)
        logprobs = torch.log_softmax(torch.randn(3, 11, 6, generator=generator), -1)[..., :5]
        kwargs = {"teacher": SparseTeacher(ids, logprobs), "divergence": "forward_kl"}
    elif kind == "dense_jsd":
        teacher = DenseTeacher(torch.randn(3, 11, VOCAB, generator=generator))
        kwargs = {"teacher": teacher, "divergence": "jsd", "temperature": 2.0}
    full, full_metrics = sad_loss(head(hidden), reasoning, action, **kwargs)
    chunked, metrics = sad_loss_from_hidden(hidden, head, VOCAB, reasoning, action, rows=3, **kwargs)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    for name, value in full_metrics.items():
        torch.testing.assert_close(metrics[name], value, rtol=1e-5, atol=1e-5)
    _assert_same(_grads(chunked, hidden, head), _grads(full, hidden, head))


def test_no_tensor_saved_for_backward_holds_all_positions_logits() -> None:
    # Autograd keeps what the backward pass needs; with chunks no saved tensor may span the logits
    # of every position (rows x vocab), whereas the plain path saves exactly such a tensor.
    hidden, head, labels = _setup()
    keep = labels != -100
    positions = int(keep.sum())
    largest: list[int] = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        largest[0] = max(largest[0], t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = sft_loss_from_hidden(hidden, head, labels, vocab=VOCAB, rows=4)
    assert largest[0] < positions * VOCAB
    loss.backward()
    largest[0] = 0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sft_loss_from_hidden(hidden, head, labels, vocab=VOCAB, rows=positions)
    assert largest[0] >= positions * VOCAB


def test_map_logit_chunks_without_grad_runs_every_chunk_once() -> None:
    hidden = torch.arange(10.0).unsqueeze(1)
    seen: list[slice] = []

    def fn(logits: torch.Tensor, where: slice) -> tuple[torch.Tensor]:
        seen.append(where)
        return (logits.sum(-1),)

    with torch.no_grad():
        (out,) = map_logit_chunks(hidden, lambda h: h.expand(-1, 3), fn, vocab=3, rows=4)
    torch.testing.assert_close(out, torch.arange(10.0) * 3)
    assert [(s.start, s.stop) for s in seen] == [(0, 4), (4, 8), (8, 10)]
