"""SFT loss, the hidden-state variant, sequence log-probs and entropy against hand arithmetic."""

import math

import torch

from trainer_core.losses import policy_entropy, sft_loss, sft_loss_from_hidden, token_entropy

LN2, LN3 = math.log(2), math.log(3)


def _logits_and_labels() -> tuple[torch.Tensor, torch.Tensor]:
    # Position 0: logits (0, ln2, 0) -> probs (1/4, 1/2, 1/4); label 1 -> CE = ln 2, argmax correct.
    # Position 1: logits (ln3, 0, 0) -> probs (3/5, 1/5, 1/5); label 2 -> CE = ln 5, argmax wrong.
    # Position 2: ignored (-100); its huge logits must not matter.
    logits = torch.tensor([[[0.0, LN2, 0.0], [LN3, 0.0, 0.0], [50.0, -50.0, 7.0]]])
    labels = torch.tensor([[1, 2, -100]])
    return logits, labels


def test_sft_loss_is_mean_ce_over_unmasked_tokens() -> None:
    logits, labels = _logits_and_labels()
    loss, metrics = sft_loss(logits, labels)
    expected = (math.log(2) + math.log(5)) / 2  # = ln(10) / 2
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    assert math.isclose(float(metrics["loss"]), expected, rel_tol=1e-6)
    assert float(metrics["mean_token_accuracy"]) == 0.5
    assert int(metrics["num_tokens"]) == 2


def test_sft_loss_gradient_is_softmax_minus_onehot_over_count() -> None:
    logits, labels = _logits_and_labels()
    logits.requires_grad_(True)
    loss, _ = sft_loss(logits, labels)
    loss.backward()
    # d CE / d logits = p - onehot(label), divided by the 2 counted tokens.
    expected = torch.tensor([[[0.25, -0.5, 0.25], [0.6, 0.2, -0.8], [0.0, 0.0, 0.0]]]) / 2
    torch.testing.assert_close(logits.grad, expected)


def test_sft_loss_sum_reduction_and_given_batch_token_count() -> None:
    logits, labels = _logits_and_labels()
    summed, _ = sft_loss(logits, labels, reduction="sum")
    assert math.isclose(summed.item(), math.log(10), rel_tol=1e-6)  # ln 2 + ln 5
    loss, metrics = sft_loss(logits, labels, num_tokens_in_batch=4)
    assert math.isclose(loss.item(), math.log(10) / 4, rel_tol=1e-6)
    assert math.isclose(float(metrics["loss"]), math.log(10) / 2, rel_tol=1e-6)


def test_sft_loss_with_no_loss_tokens_is_zero_and_backpropagates() -> None:
    logits = torch.randn(1, 2, 3, requires_grad=True)
    loss, metrics = sft_loss(logits, torch.full((1, 2), -100))
    loss.backward()
    assert loss.item() == 0.0 and int(metrics["num_tokens"]) == 0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_sft_loss_from_hidden_matches_and_never_projects_ignored_positions() -> None:
    # lm_head rows e0, e1, 0 -> logits = (h0, h1, 0): the same logits as above for h = (0, ln2), (ln3, 0).
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    # The ignored row holds NaN: if it were projected the loss would be NaN.
    hidden = torch.tensor([[[0.0, LN2], [LN3, 0.0], [float("nan"), float("nan")]]], requires_grad=True)
    labels = torch.tensor([[1, 2, -100]])
    loss, metrics = sft_loss_from_hidden(hidden, lambda h: h @ weight.T, labels, vocab=3)
    assert math.isclose(loss.item(), math.log(10) / 2, rel_tol=1e-6)
    assert float(metrics["mean_token_accuracy"]) == 0.5 and int(metrics["num_tokens"]) == 2
    loss.backward()
    assert torch.equal(hidden.grad[0, 2], torch.zeros(2))
    # Position 0: d/dh = W^T (p - onehot) / 2 = (0.25, -0.5) / 2.
    torch.testing.assert_close(hidden.grad[0, 0], torch.tensor([0.125, -0.25]))


def test_sft_loss_from_hidden_equals_full_logits_loss_on_random_inputs() -> None:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 4, generator=generator)
    weight = torch.randn(7, 4, generator=generator)
    labels = torch.tensor([[-100, -100, 3, 1, 6], [-100, 0, 2, -100, -100]])
    full, _ = sft_loss(hidden @ weight.T, labels)
    lean, _ = sft_loss_from_hidden(hidden, lambda h: h @ weight.T, labels, vocab=7)
    torch.testing.assert_close(lean, full)


def test_entropy_of_known_distributions() -> None:
    # uniform over 3: ln 3; (1/4, 1/2, 1/4): -(2 * 1/4 ln 1/4 + 1/2 ln 1/2) = 1.5 ln 2.
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, LN2, 0.0], [9.0, 0.0, 0.0]]])
    torch.testing.assert_close(token_entropy(logits)[0, :2], torch.tensor([LN3, 1.5 * LN2]))
    mean = policy_entropy(logits, torch.tensor([[True, True, False]]))
    assert math.isclose(mean.item(), (LN3 + 1.5 * LN2) / 2, rel_tol=1e-6)
