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
    weight: float = Field(
        1.0, ge=-MAX_WEIGHT, le=MAX_WEIGHT,
        description="weight of this function in the stage's total reward",
    )


class ExactMatchReward(_RewardBase):
    type: Literal["exact_match"] = Field(
        description="1.0 when the extracted final answer equals the record's answer",
    )


class NumericMatchReward(_RewardBase):
    type: Literal["numeric_match"] = Field(
        description="1.0 when the answer's last number is within tolerance of the record's",
    )
    tolerance: float = Field(
        1e-6, ge=0, le=1e12,
        description="absolute tolerance (relative for large numbers)",
    )


class RegexReward(_RewardBase):
    type: Literal["regex"] = Field(description="1.0 when pattern is found in the completion")
    pattern: str = Field(max_length=MAX_PATTERN, description="a Python regular expression (re.search)")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            regex.compile(v)  # the engine trainer_core.rewards matches with
        except regex.error as exc:
            raise ValueError(f"pattern is not a valid regular expression: {exc}") from exc
        return v


class ContainsReward(_RewardBase):
    type: Literal["contains"] = Field(
        description="1.0 when text occurs in the completion (case and whitespace insensitive)",
    )
    text: str | None = Field(
        None, max_length=MAX_PATTERN,
        description="the text to look for; default: the record's answer",
    )


class FormatReward(_RewardBase):
    type: Literal["format"] = Field(description="1.0 when the whole completion matches pattern")
    pattern: str | None = Field(
        None,
        max_length=MAX_PATTERN,
        description="a Python regular expression (re.fullmatch); default: a <think> block, then an answer",
    )


class LengthPenaltyReward(_RewardBase):
    type: Literal["length_penalty"] = Field(description="a penalty per character beyond max_length")
    max_length: int = Field(512, ge=1, le=1_000_000, description="characters allowed without penalty")
    penalty_per_char: float = Field(
        0.001, ge=0, le=MAX_WEIGHT,
        description="penalty per character beyond max_length",
    )


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

    type: Literal["combined"] = Field(description="a weighted sum of reward functions")
    functions: list[RewardFunction] = Field(
        min_length=1,
        max_length=MAX_LIST, description="the reward functions, each with its weight",
    )


REWARD_SPEC_CLASSES = (
    ExactMatchReward, NumericMatchReward, RegexReward, ContainsReward, FormatReward, LengthPenaltyReward,
    CombinedReward,
)
RewardSpec = Annotated[Union[REWARD_SPEC_CLASSES], Field(discriminator="type")]  # noqa: UP007 - from a tuple


def reward_functions(spec: RewardSpec) -> list[RewardFunction]:
    """Returns the flat list of weighted reward functions a reward spec stands for."""
    return list(spec.functions) if isinstance(spec, CombinedReward) else [spec]
