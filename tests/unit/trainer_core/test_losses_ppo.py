"""PPO rewards, GAE, whitening and the clipped losses against hand arithmetic."""

import math

import pytest
import torch

from trainer_core.losses import gae, ppo_loss, ppo_per_token_rewards, whiten


def test_per_token_rewards_put_the_score_on_the_last_valid_token() -> None:
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, -1.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    rewards, metrics = ppo_per_token_rewards(logps, ref, torch.tensor([3.0, 7.0]), mask, kl_coef=0.1)
    # Row 1: log-ratios (0.5, 0) -> -0.1 * (0.5, 0); score 3 on token 1. Row 2 has no tokens: nothing.
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 3.0, 0.0], [0.0, 0.0, 0.0]]))
    assert math.isclose(float(metrics["objective/kl"]), (0.5 + 0.0) / 2, rel_tol=1e-6)
    assert float(metrics["objective/scores"]) == 5.0


def test_gae_bootstraps_zero_after_the_last_valid_token() -> None:
    rewards = torch.tensor([[1.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 1.0, 9.0]])
    advantages, returns = gae(rewards, values, torch.tensor([[1, 1, 0]]), gamma=0.9, lam=0.8)
    # t=1 (last valid): delta = 2 + 0.9 * 0 - 1 = 1, A = 1.
    # t=0: delta = 1 + 0.9 * 1.0 - 0.5 = 1.4, A = 1.4 + 0.9 * 0.8 * 1 = 2.12. Returns = A + V.
    torch.testing.assert_close(advantages, torch.tensor([[2.12, 1.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[2.62, 2.0, 0.0]]))


def test_gae_skips_masked_gaps_and_empty_rows() -> None:
    rewards = torch.tensor([[1.0, 100.0, 2.0], [4.0, 4.0, 4.0]])
    values = torch.tensor([[0.5, 50.0, 1.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # Same numbers as the contiguous case, with the gap token left out.
    torch.testing.assert_close(advantages, torch.tensor([[2.12, 0.0, 1.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[2.62, 0.0, 2.0], [0.0, 0.0, 0.0]]))


def test_whiten_uses_masked_mean_and_bessel_variance() -> None:
    x = torch.tensor([[2.0, 4.0, 6.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # Mean 4, variance (4 + 0 + 4) / 2 = 4, std 2.
    torch.testing.assert_close(whiten(x, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]))
    torch.testing.assert_close(whiten(x, mask, shift_mean=False), torch.tensor([[3.0, 4.0, 5.0, 0.0]]))
    with pytest.raises(ValueError):
        whiten(x, torch.tensor([[1, 0, 0, 0]]))


def test_ppo_loss_clipped_policy_and_value_terms() -> None:
    mask = torch.tensor([[1, 1, 0]])
    logps = torch.tensor([[math.log(1.5), math.log(1.1), 3.0]], requires_grad=True)
    old_logps = torch.zeros(1, 3)
    advantages = torch.tensor([[1.0, -1.0, 1e6]])
    values = torch.tensor([[2.0, 0.0, 1e6]], requires_grad=True)
    old_values = torch.tensor([[1.0, 1.0, 0.0]])
    returns = torch.tensor([[1.5, 0.0, -1e6]])
    loss, metrics = ppo_loss(logps, old_logps, values, old_values, advantages, returns, mask, vf_coef=0.1)
    # Policy: token 0 max(-1.5, -1.2) = -1.2 (clipped); token 1 max(1.1, 1.1) = 1.1 -> mean -0.05.
    # Value: token 0 V 2 -> clipped 1.2, R 1.5: max(0.25, 0.09) = 0.25;
    #        token 1 V 0 -> clipped 0.8, R 0:   max(0, 0.64) = 0.64 -> 0.5 * mean = 0.2225.
    assert math.isclose(float(metrics["loss/policy"]), -0.05, rel_tol=1e-5)
    assert math.isclose(float(metrics["loss/value"]), 0.2225, rel_tol=1e-5)
    assert math.isclose(loss.item(), -0.05 + 0.1 * 0.2225, rel_tol=1e-5)
    assert float(metrics["policy/clipfrac"]) == 0.5
    assert float(metrics["value/clipfrac"]) == 0.5
    approxkl = 0.5 * (math.log(1.5) ** 2 + math.log(1.1) ** 2) / 2
    assert math.isclose(float(metrics["policy/approxkl"]), approxkl, rel_tol=1e-5)
    loss.backward()
    # Token 0 clipped -> no policy gradient; token 1: d(-A rho)/dlogp = -A rho = 1.1, / 2 tokens.
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, 0.55, 0.0]]))
    # Value token 0 unclipped: 0.1 * 0.5 * 2 (V - R) / 2 = 0.025; token 1 clipped branch: 0.
    torch.testing.assert_close(values.grad, torch.tensor([[0.025, 0.0, 0.0]]))

    summed, _ = ppo_loss(
        logps, old_logps, values, old_values, advantages, returns, mask, vf_coef=0.1, reduction="sum"
    )
    # Token sums: policy -1.2 + 1.1, value 0.5 * (0.25 + 0.64).
    assert math.isclose(summed.item(), -0.1 + 0.1 * 0.5 * 0.89, rel_tol=1e-5)
