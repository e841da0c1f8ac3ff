"""GRPO advantages and clipped loss against hand arithmetic."""

import math

import pytest
import torch

from trainer_core.losses import grpo_advantages, grpo_loss

# Two groups of 3: (1, 0, 0) and (2, 2, 2).
REWARDS = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 2.0])
# Group 1: mean 1/3, Bessel variance ((2/3)^2 + 2 (1/3)^2) / 2 = 1/3, std = sqrt(1/3).
GROUP1_STD = math.sqrt(1 / 3)
CENTRED1 = [2 / 3, -1 / 3, -1 / 3]


def test_group_scaling() -> None:
    advantages, metrics = grpo_advantages(REWARDS, group_size=3)
    expected = [c / (GROUP1_STD + 1e-4) for c in CENTRED1] + [0.0, 0.0, 0.0]
    torch.testing.assert_close(advantages, torch.tensor(expected))
    assert math.isclose(float(metrics["reward"]), 7 / 6, rel_tol=1e-6)
    assert math.isclose(float(metrics["reward_std"]), GROUP1_STD / 2, rel_tol=1e-6)
    assert float(metrics["frac_reward_zero_std"]) == 0.5  # the (2, 2, 2) group


def test_batch_scaling_divides_by_the_batch_std() -> None:
    advantages, _ = grpo_advantages(REWARDS, group_size=3, scaling="batch")
    # Batch mean 7/6; squared deviations 1/36 + 2 * 49/36 + 3 * 25/36 = 174/36; Bessel: / 5.
    batch_std = math.sqrt(174 / 36 / 5)
    expected = [c / (batch_std + 1e-4) for c in CENTRED1] + [0.0, 0.0, 0.0]
    torch.testing.assert_close(advantages, torch.tensor(expected))


def test_no_scaling_only_centres() -> None:
    advantages, _ = grpo_advantages(REWARDS, group_size=3, scaling="none")
    torch.testing.assert_close(advantages, torch.tensor(CENTRED1 + [0.0, 0.0, 0.0]))


@pytest.mark.parametrize("group_size, scaling", [(4, "group"), (1, "group"), (3, "rank")])
def test_bad_advantage_arguments_raise(group_size: int, scaling: str) -> None:
    with pytest.raises(ValueError):
        grpo_advantages(REWARDS, group_size=group_size, scaling=scaling)


MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])
ADVANTAGES = torch.tensor([1.0, -2.0])


def test_on_policy_loss_is_minus_the_advantage() -> None:
    logps = torch.zeros(2, 3, requires_grad=True)
    loss, metrics = grpo_loss(logps, logps.detach(), None, ADVANTAGES, MASK)
    # Ratio 1 everywhere: per-token -A. "grpo": mean(-1, -1) = -1 and mean(2) = 2 -> batch mean 0.5.
    assert math.isclose(loss.item(), 0.5, rel_tol=1e-6)
    assert float(metrics["clip_ratio"]) == 0.0 and "kl" not in metrics
    loss.backward()
    # d/dlogp of -rho A at rho = 1 is -A, divided by sequence length and batch size.
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.25, -0.25, 0.0], [1.0, 0.0, 0.0]]))
    dapo, _ = grpo_loss(logps, logps.detach(), None, ADVANTAGES, MASK, aggregation="dapo")
    assert math.isclose(dapo.item(), (-1 - 1 + 2) / 3, abs_tol=1e-7)  # token sum / 3 tokens


def test_sum_reduction_per_aggregation() -> None:
    logps = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    ref = torch.tensor([[math.log(2), 0.0, 0.0], [0.0, 0.0, 0.0]])
    k3 = 1 - math.log(2)
    # Per-token -A + 0.1 k3: sequence 1 (-1 + 0.1 k3, -1), sequence 2 (2).
    grpo_sum, _ = grpo_loss(logps, logps, ref, ADVANTAGES, MASK, beta=0.1, reduction="sum")
    assert math.isclose(grpo_sum.item(), (-2 + 0.1 * k3) / 2 + 2, rel_tol=1e-6)  # sum of sequence means
    dapo_sum, _ = grpo_loss(
        logps, logps, ref, ADVANTAGES, MASK, beta=0.1, aggregation="dapo", reduction="sum"
    )
    assert math.isclose(dapo_sum.item(), -2 + 0.1 * k3 + 2, rel_tol=1e-6)  # token sum


def test_k3_kl_penalty() -> None:
    logps = torch.zeros(2, 3)
    ref = torch.tensor([[math.log(2), 0.0, 5.0], [0.0, 0.0, 0.0]])  # the masked 5.0 must not count
    loss, metrics = grpo_loss(logps, logps, ref, ADVANTAGES, MASK, beta=0.1)
    # k3 at ref - logp = ln 2: e^ln2 - ln2 - 1 = 1 - ln 2; 0 elsewhere.
    k3 = 1 - math.log(2)
    assert math.isclose(float(metrics["kl"]), k3 / 3, rel_tol=1e-6)
    # Sequence 1: (-1 + 0.1 k3 - 1) / 2; sequence 2: 2.
    assert math.isclose(loss.item(), ((-2 + 0.1 * k3) / 2 + 2) / 2, rel_tol=1e-6)


def test_clipping_with_symmetric_and_asymmetric_epsilon() -> None:
    # Token (0,0): rho 1.5, A = 1 -> min(1.5, 1.2) = 1.2, clipped high.
    # Token (0,1): rho 0.5, A = 1 -> min(0.5, 0.8) = 0.5, not clipped (low ratio, positive A).
    # Token (1,0): rho 0.5, A = -2 -> min(-1, -1.6) = -1.6, clipped low.
    logps = torch.tensor([[math.log(1.5), math.log(0.5), 0.0], [math.log(0.5), 0.0, 0.0]], requires_grad=True)
    old = torch.zeros(2, 3)
    loss, metrics = grpo_loss(logps, old, None, ADVANTAGES, MASK, epsilon=0.2)
    assert math.isclose(loss.item(), ((-1.2 - 0.5) / 2 + 1.6) / 2, rel_tol=1e-6)
    assert math.isclose(float(metrics["clip_ratio"]), 2 / 3, rel_tol=1e-6)
    assert math.isclose(float(metrics["clip_ratio/low"]), 1 / 3, rel_tol=1e-6)
    assert math.isclose(float(metrics["clip_ratio/high"]), 1 / 3, rel_tol=1e-6)
    loss.backward()
    # Clipped tokens get no gradient; token (0,1): d(-rho A)/dlogp = -rho A = -0.5, / 2 tokens / 2 seqs.
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, -0.125, 0.0], [0.0, 0.0, 0.0]]))

    # epsilon_high = 0.6 lets rho = 1.5 through: sequence 1 becomes (-1.5 - 0.5) / 2 = -1.
    loss_high, _ = grpo_loss(logps, old, None, ADVANTAGES, MASK, epsilon=0.2, epsilon_high=0.6)
    assert math.isclose(loss_high.item(), (-1.0 + 1.6) / 2, rel_tol=1e-6)


def test_beta_without_reference_raises() -> None:
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(torch.zeros(1, 1), torch.zeros(1, 1), None, torch.zeros(1), torch.ones(1, 1), beta=0.1)
