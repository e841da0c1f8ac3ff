"""DPO, cDPO and IPO against hand arithmetic on two preference pairs."""

import math

import pytest
import torch

from trainer_core.losses import dpo_loss

# Pair 1: chosen log-ratio -1 - (-2) = 1, rejected log-ratio -3 - (-2) = -1 -> Delta = 2.
# Pair 2: chosen log-ratio -2 - (-2) = 0, rejected log-ratio -1 - (-2) = 1 -> Delta = -1.
POLICY_CHOSEN = [-1.0, -2.0]
POLICY_REJECTED = [-3.0, -1.0]
REF = [-2.0, -2.0]
BETA = 0.5  # beta * Delta = 1 and -0.5


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))  # -log sigma(-x)


def _loss(**kwargs: object) -> tuple[torch.Tensor, dict]:
    return dpo_loss(
        torch.tensor(POLICY_CHOSEN), torch.tensor(POLICY_REJECTED), torch.tensor(REF), torch.tensor(REF),
        beta=BETA, **kwargs,
    )


def test_sigmoid_loss_and_metrics() -> None:
    loss, metrics = _loss()
    # -log sigma(x) = log(1 + e^-x): pair 1 log(1 + e^-1) = 0.3133, pair 2 log(1 + e^0.5) = 0.9741.
    expected = (_softplus(-1.0) + _softplus(0.5)) / 2
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    assert math.isclose(expected, 0.643670, rel_tol=1e-5)
    # Implicit rewards beta * log-ratio: chosen (0.5, 0), rejected (-0.5, 0.5).
    assert math.isclose(float(metrics["rewards/chosen"]), 0.25, rel_tol=1e-6)
    assert math.isclose(float(metrics["rewards/rejected"]), 0.0, abs_tol=1e-7)
    assert float(metrics["rewards/accuracies"]) == 0.5  # pair 1 only
    assert math.isclose(float(metrics["rewards/margins"]), (1.0 - 0.5) / 2, rel_tol=1e-6)
    assert float(metrics["logps/chosen"]) == -1.5
    assert float(metrics["logps/rejected"]) == -2.0


def test_sigmoid_gradient_wrt_chosen_logps() -> None:
    chosen = torch.tensor(POLICY_CHOSEN, requires_grad=True)
    loss, _ = dpo_loss(chosen, torch.tensor(POLICY_REJECTED), torch.tensor(REF), torch.tensor(REF), beta=BETA)
    loss.backward()
    # d/dlogp_c of -log sigma(beta Delta) / 2 = -beta sigma(-beta Delta) / 2.
    sigma = [1 / (1 + math.exp(1.0)), 1 / (1 + math.exp(-0.5))]
    torch.testing.assert_close(chosen.grad, torch.tensor([-BETA * s / 2 for s in sigma]))


def test_label_smoothing_is_conservative_dpo() -> None:
    loss, _ = _loss(label_smoothing=0.1)
    # -(1 - eps) log sigma(x) - eps log sigma(-x) with x = 1 and x = -0.5.
    pair1 = 0.9 * _softplus(-1.0) + 0.1 * _softplus(1.0)
    pair2 = 0.9 * _softplus(0.5) + 0.1 * _softplus(-0.5)
    assert math.isclose(loss.item(), (pair1 + pair2) / 2, rel_tol=1e-6)


def test_sum_reduction_sums_over_pairs() -> None:
    loss, _ = _loss(reduction="sum")
    assert math.isclose(loss.item(), _softplus(-1.0) + _softplus(0.5), rel_tol=1e-6)


def test_ipo_loss() -> None:
    loss, _ = _loss(loss_type="ipo")
    # (Delta - 1 / (2 beta))^2 with 1 / (2 * 0.5) = 1: (2 - 1)^2 = 1, (-1 - 1)^2 = 4 -> mean 2.5.
    assert math.isclose(loss.item(), 2.5, rel_tol=1e-6)


def test_reference_logps_get_no_gradient() -> None:
    ref = torch.tensor(REF, requires_grad=True)
    chosen = torch.tensor(POLICY_CHOSEN, requires_grad=True)
    loss, _ = dpo_loss(chosen, torch.tensor(POLICY_REJECTED), ref, ref)
    loss.backward()
    assert ref.grad is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"beta": 0.0},
        {"loss_type": "hinge"},
        {"label_smoothing": 0.5},
        {"loss_type": "ipo", "label_smoothing": 0.1},
    ],
)
def test_invalid_settings_raise(kwargs: dict) -> None:
    x = torch.zeros(1)
    with pytest.raises(ValueError):
        dpo_loss(x, x, x, x, **kwargs)
