"""Reward specs of a PPO/GRPO stage: one registered reward function, or a weighted sum of them.

Part of the run spec contract (``trainer_core.config``): imports without torch. The functions
themselves are in ``trainer_core.rewards``.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _RewardBase(_Strict):
    weight: float = 1.0


class ExactMatchReward(_RewardBase):
    type: Literal["exact_match"]


class NumericMatchReward(_RewardBase):
    type: Literal["numeric_match"]
    tolerance: float = Field(1e-6, ge=0)


class RegexReward(_RewardBase):
    type: Literal["regex"]
    pattern: str

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"pattern is not a valid regular expression: {exc}") from exc
        return v


class ContainsReward(_RewardBase):
    type: Literal["contains"]
    text: str | None = None


class FormatReward(_RewardBase):
    type: Literal["format"]
    pattern: str | None = None


class LengthPenaltyReward(_RewardBase):
    type: Literal["length_penalty"]
    max_length: int = Field(512, ge=1)
    penalty_per_char: float = Field(0.001, ge=0)


RewardFunction = Annotated[
    ExactMatchReward
    | NumericMatchReward
    | RegexReward
    | ContainsReward
    | FormatReward
    | LengthPenaltyReward,
    Field(discriminator="type"),
]


class CombinedReward(_Strict):
    """A weighted sum of reward functions."""

    type: Literal["combined"]
    functions: list[RewardFunction] = Field(min_length=1)


REWARD_SPEC_CLASSES = (
    ExactMatchReward, NumericMatchReward, RegexReward, ContainsReward, FormatReward, LengthPenaltyReward,
    CombinedReward,
)
RewardSpec = Annotated[Union[REWARD_SPEC_CLASSES], Field(discriminator="type")]  # noqa: UP007 - from a tuple


def reward_functions(spec: RewardSpec) -> list[RewardFunction]:
    """Returns the flat list of weighted reward functions a reward spec stands for."""
    return list(spec.functions) if isinstance(spec, CombinedReward) else [spec]
