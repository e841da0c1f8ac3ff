"""Pure loss functions of tensors, one module per method; each returns ``(loss, metrics)``."""

from trainer_core.losses.common import (
    IGNORE_INDEX,
    REDUCTIONS,
    Metrics,
    Reduction,
    masked_mean,
    masked_sum,
    policy_entropy,
    token_entropy,
    token_logps,
)
from trainer_core.losses.divergences import (
    alpha_divergence,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    symmetric_kl,
)
from trainer_core.losses.dpo import DPO_LOSS_TYPES, DpoLossType, dpo_loss
from trainer_core.losses.grpo import (
    ADVANTAGE_SCALINGS,
    GRPO_AGGREGATIONS,
    AdvantageScaling,
    GrpoAggregation,
    grpo_advantages,
    grpo_loss,
)
from trainer_core.losses.ppo import gae, last_valid_index, ppo_loss, ppo_per_token_rewards, whiten
from trainer_core.losses.sad import (
    DIVERGENCES,
    SPAN_WEIGHTINGS,
    DenseTeacher,
    Divergence,
    SpanWeighting,
    SparseTeacher,
    Teacher,
    sad_loss,
)
from trainer_core.losses.sft import sft_loss, sft_loss_from_hidden

__all__ = [
    "ADVANTAGE_SCALINGS",
    "DIVERGENCES",
    "DPO_LOSS_TYPES",
    "GRPO_AGGREGATIONS",
    "IGNORE_INDEX",
    "REDUCTIONS",
    "SPAN_WEIGHTINGS",
    "AdvantageScaling",
    "DenseTeacher",
    "Divergence",
    "DpoLossType",
    "GrpoAggregation",
    "Metrics",
    "Reduction",
    "SpanWeighting",
    "SparseTeacher",
    "Teacher",
    "alpha_divergence",
    "dpo_loss",
    "forward_kl",
    "gae",
    "generalized_jsd",
    "grpo_advantages",
    "grpo_loss",
    "last_valid_index",
    "masked_mean",
    "masked_sum",
    "policy_entropy",
    "ppo_loss",
    "ppo_per_token_rewards",
    "reverse_kl",
    "sad_loss",
    "sft_loss",
    "sft_loss_from_hidden",
    "symmetric_kl",
    "token_entropy",
    "token_logps",
    "whiten",
]
