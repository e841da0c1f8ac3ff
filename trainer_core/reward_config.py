"""Reward specs of a PPO/GRPO stage: one registered reward function, or a weighted sum of them.

Part of the run spec contract (``trainer_core.config``): imports without torch. The functions
themselves are in ``trainer_core.rewards``.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import regex
from pydantic import Field, field_validator

from trainer_core.spec_base import MAX_LIST, MAX_WEIGHT, SpecModel

MAX_PATTERN = 2000


class _RewardBase(SpecModel):
    weight: float = Field(1.0, ge=-MAX_WEIGHT, le=MAX_WEIGHT)


class ExactMatchReward(_RewardBase):
    type: Literal["exact_match"]


class NumericMatchReward(_RewardBase):
    type: Literal["numeric_match"]
    tolerance: float = Field(1e-6, ge=0, le=1e12)


class RegexReward(_RewardBase):
    type: Literal["regex"]
    pattern: str = Field(max_length=MAX_PATTERN)

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            regex.compile(v)  # the engine trainer_core.rewards matches with
        except regex.error as exc:
            raise ValueError(f"pattern is not a valid regular expression: {exc}") from exc
        return v


class ContainsReward(_RewardBase):
    type: Literal["contains"]
    text: str | None = Field(None, max_length=MAX_PATTERN)


class FormatReward(_RewardBase):
    type: Literal["format"]
    pattern: str | None = Field(None, max_length=MAX_PATTERN)


class LengthPenaltyReward(_RewardBase):
    type: Literal["length_penalty"]
    max_length: int = Field(512, ge=1, le=1_000_000)
    penalty_per_char: float = Field(0.001, ge=0, le=MAX_WEIGHT)


RewardFunction = Annotated[
    ExactMatchReward
    | NumericMatchReward
    | RegexReward
    | ContainsReward
    | FormatReward
    | LengthPenaltyReward,
    Field(discriminator="type"),
]


class CombinedReward(SpecModel):
    """A weighted sum of reward functions."""

    type: Literal["combined"]
    functions: list[RewardFunction] = Field(min_length=1, max_length=MAX_LIST)


REWARD_SPEC_CLASSES = (
    ExactMatchReward, NumericMatchReward, RegexReward, ContainsReward, FormatReward, LengthPenaltyReward,
    CombinedReward,
)
RewardSpec = Annotated[Union[REWARD_SPEC_CLASSES], Field(discriminator="type")]  # noqa: UP007 - from a tuple


def reward_functions(spec: RewardSpec) -> list[RewardFunction]:
    """Returns the flat list of weighted reward functions a reward spec stands for."""
    return list(spec.functions) if isinstance(spec, CombinedReward) else [spec]
