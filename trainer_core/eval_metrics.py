"""Which eval metrics exist and which dataset formats each needs (torch-free: the API validates with it).

See ``trainer_core.evaluation`` for how each metric is computed.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from trainer_core.config import SamplingParams
from trainer_core.rewards import REWARD_FUNCTIONS

LIKELIHOOD_METRICS = ("loss", "perplexity")
PREFERENCE_METRICS = ("preference_accuracy",)


def _needs_parameters(name: str) -> list[str]:
    """Returns the keyword parameters reward ``name`` cannot do without (such as regex's pattern)."""
    signature = inspect.signature(REWARD_FUNCTIONS[name])
    return [
        p.name for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY and p.default is p.empty
    ]


# Rewards usable as a metric by name alone: those with no required parameter.
REWARD_METRICS = tuple(name for name in REWARD_FUNCTIONS if not _needs_parameters(name))
METRICS = (*LIKELIHOOD_METRICS, *PREFERENCE_METRICS, *REWARD_METRICS)

# Scored metrics compare models, so evals generate greedily unless told otherwise; sample i of a
# sampled eval uses seed + i.
EVAL_SAMPLING_DEFAULTS: dict[str, object] = {"max_tokens": 128, "temperature": 0.0, "seed": 0}
EVAL_SAMPLING = SamplingParams.model_validate(EVAL_SAMPLING_DEFAULTS)


def metric_formats(metric: str) -> tuple[str, ...]:
    """Returns the dataset formats ``metric`` can be computed on; raises ValueError for an unknown metric."""
    if metric in LIKELIHOOD_METRICS:
        return ("sft", "preference")
    if metric in PREFERENCE_METRICS:
        return ("preference",)
    if metric in REWARD_METRICS:
        return ("prompts", "sft")
    if metric in REWARD_FUNCTIONS:
        needed = ", ".join(_needs_parameters(metric))
        raise ValueError(
            f"reward {metric!r} needs parameters ({needed}) and cannot be used as an eval metric"
        )
    raise ValueError(f"unknown metric {metric!r}; known metrics: {', '.join(METRICS)}")


def check_metrics(metrics: Sequence[str], fmt: str) -> None:
    """Raises ValueError naming the first metric that cannot be computed on ``fmt`` records."""
    if not metrics:
        raise ValueError("name at least one metric")
    for metric in metrics:
        formats = metric_formats(metric)
        if fmt not in formats:
            raise ValueError(
                f"metric {metric!r} needs {' or '.join(formats)} records; the dataset is {fmt!r}"
            )
