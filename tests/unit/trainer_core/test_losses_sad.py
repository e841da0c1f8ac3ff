"""SAD loss and the distillation divergences against hand arithmetic (vocab 3 or 4)."""

import math

import pytest
import torch

from trainer_core.losses import DenseTeacher, SparseTeacher, sad_loss
from trainer_core.losses.divergences import alpha_divergence, forward_kl, generalized_jsd, reverse_kl

ln = math.log

# Positions: 0 reasoning, 1 reasoning, 2 action, 3 observation (no loss).
TEACHER_P = [[1 / 2, 1 / 4, 1 / 4], [0.2, 0.3, 0.5], [1 / 4, 1 / 2, 1 / 4], [0.9, 0.05, 0.05]]
STUDENT_P = [[1 / 3, 1 / 3, 1 / 3], [0.2, 0.3, 0.5], [1 / 2, 1 / 4, 1 / 4], [0.1, 0.1, 0.8]]
REASONING = torch.tensor([[True, True, False, False]])
ACTION = torch.tensor([[False, False, True, False]])
# Forward KL by hand: pos 0: 1/2 ln(3/2) + 2 * 1/4 ln(3/4) = 1/2 ln(9/8); pos 1: 0;
# pos 2: 1/4 ln(1/2) + 1/2 ln 2 + 1/4 ln 1 = 1/4 ln 2.
FWD = [0.5 * ln(9 / 8), 0.0, 0.25 * ln(2)]
# Reverse KL: pos 0: 1/3 (ln(2/3) + 2 ln(4/3)) = 1/3 ln(32/27); pos 2: 1/2 ln 2 + 1/4 ln(1/2) = 1/4 ln 2.
REV = [ln(32 / 27) / 3, 0.0, 0.25 * ln(2)]


def _student(requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor([STUDENT_P]).log().requires_grad_(requires_grad)


def _teacher() -> DenseTeacher:
    return DenseTeacher(torch.tensor([TEACHER_P]).log())


def _sad(**kwargs: object) -> tuple[torch.Tensor, dict]:
    return sad_loss(_student(), REASONING, ACTION, teacher=_teacher(), **kwargs)


def test_span_type_weights_per_span_means() -> None:
    loss, metrics = _sad(reasoning_weight=2.0, action_weight=0.5)
    reasoning_mean = (FWD[0] + FWD[1]) / 2
    assert math.isclose(loss.item(), 2.0 * reasoning_mean + 0.5 * FWD[2], rel_tol=1e-5)
    assert math.isclose(float(metrics["loss/reasoning"]), reasoning_mean, rel_tol=1e-5)
    assert math.isclose(float(metrics["loss/action"]), FWD[2], rel_tol=1e-5)
    assert math.isclose(float(metrics["kl/reasoning"]), reasoning_mean, rel_tol=1e-5)
    assert int(metrics["tokens/reasoning"]) == 2 and int(metrics["tokens/action"]) == 1


def test_uniform_is_the_token_mean_over_all_loss_tokens() -> None:
    loss, _ = _sad(weighting="uniform", reasoning_weight=5.0)  # weights are ignored
    assert math.isclose(loss.item(), sum(FWD) / 3, rel_tol=1e-5)


def test_reverse_and_symmetric_kl() -> None:
    loss, metrics = _sad(divergence="reverse_kl")
    assert math.isclose(loss.item(), (REV[0] + REV[1]) / 2 + REV[2], rel_tol=1e-5)
    # kl/* stays the forward KL whatever is trained.
    assert math.isclose(float(metrics["kl/action"]), FWD[2], rel_tol=1e-5)
    loss, _ = _sad(divergence="symmetric_kl")
    symmetric = [(f + r) / 2 for f, r in zip(FWD, REV, strict=True)]
    assert math.isclose(loss.item(), (symmetric[0] + symmetric[1]) / 2 + symmetric[2], rel_tol=1e-5)


def test_temperature_softens_both_and_scales_by_tau_squared() -> None:
    loss, _ = _sad(temperature=2.0, reasoning_weight=1.0, action_weight=0.0)
    # tau = 2 at pos 0: teacher p^(1/2) renormalised = (a, b, b) with a = sqrt(1/2) / (sqrt(1/2) + 1),
    # b = (1/2) / (sqrt(1/2) + 1); student stays uniform. Pos 1: equal distributions -> 0.
    a = math.sqrt(0.5) / (math.sqrt(0.5) + 1)
    b = 0.5 / (math.sqrt(0.5) + 1)
    kl0 = a * ln(3 * a) + 2 * b * ln(3 * b)
    assert math.isclose(loss.item(), 4 * (kl0 + 0.0) / 2, rel_tol=1e-5)


def test_observation_tokens_never_affect_the_loss() -> None:
    student = _student(requires_grad=True)
    loss, _ = sad_loss(student, REASONING, ACTION, teacher=_teacher())
    changed = torch.tensor([TEACHER_P]).log()
    changed[0, 3] = torch.tensor([0.01, 0.01, 0.98]).log()
    changed_loss, _ = sad_loss(student, REASONING, ACTION, teacher=DenseTeacher(changed))
    assert changed_loss.item() == loss.item()
    loss.backward()
    assert torch.equal(student.grad[0, 3], torch.zeros(3))


def test_confidence_weighting_uses_normalised_teacher_entropy() -> None:
    teacher_p = [TEACHER_P[0], TEACHER_P[1], [1 / 3, 1 / 3, 1 / 3], TEACHER_P[3]]
    loss, metrics = sad_loss(
        _student(), REASONING, ACTION, teacher=DenseTeacher(torch.tensor([teacher_p]).log()),
        weighting="confidence",
    )
    # Pos 0: H = -(1/2 ln 1/2 + 2 * 1/4 ln 1/4) = 1.5 ln 2, c = 1 - 1.5 ln 2 / ln 3.
    # Pos 2: uniform teacher -> c = 0, so the action term vanishes.
    c0 = 1 - 1.5 * ln(2) / ln(3)
    assert math.isclose(loss.item(), c0 * FWD[0] / 2, rel_tol=1e-5)
    assert float(metrics["loss/action"]) == pytest.approx(0.0, abs=1e-6)


def test_scheduled_weights_interpolate_with_progress() -> None:
    loss, _ = _sad(
        weighting="scheduled", reasoning_weight=1.0, reasoning_weight_end=3.0,
        action_weight=1.0, action_weight_end=0.0, progress=0.5,
    )
    # Halfway: lambda_r = 2, lambda_a = 0.5.
    assert math.isclose(loss.item(), 2.0 * FWD[0] / 2 + 0.5 * FWD[2], rel_tol=1e-5)


def test_ce_on_teacher_tokens_without_teacher_distribution() -> None:
    labels = torch.tensor([[0, 2, 1, 0]])
    loss, metrics = sad_loss(_student(), REASONING, ACTION, labels=labels, divergence="ce")
    # -ln p_S(label): pos 0 ln 3, pos 1 -ln 0.5, pos 2 -ln 1/4 = ln 4.
    assert math.isclose(loss.item(), (ln(3) + ln(2)) / 2 + ln(4), rel_tol=1e-5)
    assert "kl/reasoning" not in metrics
    # An ignored label inside a span drops that token.
    dropped, metrics = sad_loss(
        _student(), REASONING, ACTION, labels=torch.tensor([[0, -100, 1, 0]]), divergence="ce"
    )
    assert math.isclose(dropped.item(), ln(3) + ln(4), rel_tol=1e-5)
    assert int(metrics["tokens/reasoning"]) == 1


# Sparse teacher, vocab 4: student probs (0.1, 0.2, 0.3, 0.4); teacher top-2 ids (2, 0) with
# log-probs ln 0.5, ln 0.3 (tail 0.2). Student at those ids: 0.3, 0.1 (tail 0.6).
SPARSE_STUDENT = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]]).log()
SPARSE_TEACHER = SparseTeacher(torch.tensor([[[2, 0]]]), torch.tensor([[[0.5, 0.3]]]).log())
ONE_REASONING = torch.tensor([[True]])
NO_ACTION = torch.tensor([[False]])


def test_sparse_teacher_with_tail_bucket() -> None:
    loss, _ = sad_loss(SPARSE_STUDENT, ONE_REASONING, NO_ACTION, teacher=SPARSE_TEACHER)
    expected = 0.5 * ln(0.5 / 0.3) + 0.3 * ln(0.3 / 0.1) + 0.2 * ln(0.2 / 0.6)
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)


def test_sparse_teacher_renormalised_over_top_k() -> None:
    loss, _ = sad_loss(SPARSE_STUDENT, ONE_REASONING, NO_ACTION, teacher=SPARSE_TEACHER, tail_bucket=False)
    # Teacher (5/8, 3/8); student (3/4, 1/4).
    expected = 5 / 8 * ln((5 / 8) / (3 / 4)) + 3 / 8 * ln((3 / 8) / (1 / 4))
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
    tempered, _ = sad_loss(
        SPARSE_STUDENT, ONE_REASONING, NO_ACTION, teacher=SPARSE_TEACHER, tail_bucket=False, temperature=2.0
    )
    # tau = 2: p^(1/2) renormalised over the two ids, times tau^2.
    t = [math.sqrt(0.5), math.sqrt(0.3)]
    s = [math.sqrt(0.3), math.sqrt(0.1)]
    t = [x / sum(t) for x in t]
    s = [x / sum(s) for x in s]
    expected = 4 * sum(ti * ln(ti / si) for ti, si in zip(t, s, strict=True))
    assert math.isclose(tempered.item(), expected, rel_tol=1e-5)


def test_sparse_teacher_over_the_whole_vocabulary_equals_dense() -> None:
    teacher_logp = torch.tensor([[[0.4, 0.3, 0.2, 0.1]]]).log()
    ids = torch.tensor([[[3, 1, 0, 2]]])
    sparse, _ = sad_loss(
        SPARSE_STUDENT, ONE_REASONING, NO_ACTION,
        teacher=SparseTeacher(ids, teacher_logp.gather(-1, ids)), tail_bucket=False,
    )
    dense, _ = sad_loss(SPARSE_STUDENT, ONE_REASONING, NO_ACTION, teacher=DenseTeacher(teacher_logp))
    torch.testing.assert_close(sparse, dense)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"divergence": "forward_kl"},  # no teacher
        {"divergence": "ce"},  # no labels
        {"divergence": "tvd", "teacher": DenseTeacher(torch.zeros(1, 4, 3))},
        {"weighting": "confidence", "divergence": "ce", "labels": torch.zeros(1, 4, dtype=torch.long)},
        {"teacher": DenseTeacher(torch.zeros(1, 4, 3)), "weighting": "scheduled", "progress": 1.5},
        {"teacher": DenseTeacher(torch.zeros(1, 4, 5))},  # teacher vocabulary differs from the student's
        {"teacher": SparseTeacher(torch.zeros(1, 4, 2, dtype=torch.long), torch.zeros(1, 4, 3))},
    ],
)
def test_invalid_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        sad_loss(_student(), REASONING, ACTION, **kwargs)


def test_overlapping_masks_and_tempered_tail_bucket_raise() -> None:
    with pytest.raises(ValueError, match="overlap"):
        sad_loss(_student(), REASONING, REASONING, teacher=_teacher())
    with pytest.raises(ValueError, match="tail_bucket"):
        sad_loss(SPARSE_STUDENT, ONE_REASONING, NO_ACTION, teacher=SPARSE_TEACHER, temperature=2.0)


# Divergence functions on one position, in float64.
T64 = torch.tensor([1 / 2, 1 / 4, 1 / 4], dtype=torch.float64).log()
S64 = torch.tensor([1 / 3, 1 / 3, 1 / 3], dtype=torch.float64).log()


def test_generalized_jsd_by_hand_and_its_limits() -> None:
    # beta = 1/2: M = (5/12, 7/24, 7/24).
    kl_t_m = 0.5 * ln(0.5 / (5 / 12)) + 0.5 * ln(0.25 / (7 / 24))
    kl_s_m = ln((1 / 3) / (5 / 12)) / 3 + 2 / 3 * ln((1 / 3) / (7 / 24))
    assert math.isclose(generalized_jsd(S64, T64, 0.5).item(), 0.5 * kl_t_m + 0.5 * kl_s_m, rel_tol=1e-9)
    forward, reverse = forward_kl(S64, T64).item(), reverse_kl(S64, T64).item()
    assert generalized_jsd(S64, T64, 0.0).item() == forward
    assert generalized_jsd(S64, T64, 1.0).item() == reverse
    # The endpoints are the limits of the normalised divergence: JSD/beta -> forward, JSD/(1-beta) -> reverse.
    beta = 1e-5
    assert math.isclose(generalized_jsd(S64, T64, beta).item() / beta, forward, rel_tol=1e-3)
    assert math.isclose(generalized_jsd(S64, T64, 1 - beta).item() / beta, reverse, rel_tol=1e-3)


def test_alpha_divergence_by_hand_and_its_limits() -> None:
    # alpha = 1/2: 4 (1 - sum sqrt(p q)) = 4 (1 - sqrt(1/6) - 2 sqrt(1/12)).
    expected = 4 * (1 - math.sqrt(1 / 6) - 2 * math.sqrt(1 / 12))
    assert math.isclose(alpha_divergence(S64, T64, 0.5).item(), expected, rel_tol=1e-9)
    forward, reverse = forward_kl(S64, T64).item(), reverse_kl(S64, T64).item()
    assert math.isclose(alpha_divergence(S64, T64, 1 - 1e-6).item(), forward, rel_tol=1e-4)
    assert math.isclose(alpha_divergence(S64, T64, 1e-6).item(), reverse, rel_tol=1e-4)
    with pytest.raises(ValueError):
        alpha_divergence(S64, T64, 1.0)


def test_zero_teacher_probability_gives_no_nan() -> None:
    # Teacher (1, 0, 0): forward KL = ln(1 / p_S(0)) = ln 3; the -inf log-probs must not produce NaN.
    student = S64.clone().requires_grad_(True)
    teacher = torch.tensor([0.0, -math.inf, -math.inf], dtype=torch.float64)
    value = forward_kl(student, teacher)
    value.backward()
    assert math.isclose(value.item(), ln(3), rel_tol=1e-9)
    assert not torch.isnan(student.grad).any()
    assert not torch.isnan(generalized_jsd(student, teacher, 0.5)).any()
