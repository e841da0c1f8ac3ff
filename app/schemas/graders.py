"""Grader routes' shapes, as OpenAI's ``/v1/fine_tuning/alpha/graders/{run,validate}``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from trainer_core.grader_config import Grader
from trainer_core.spec_base import InputModel


class GraderValidateIn(InputModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    grader: Grader


class GraderValidateOut(BaseModel):
    grader: dict[str, Any]


class GraderRunIn(InputModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    grader: Grader
    model_sample: str = Field(max_length=1_000_000, description="the completion to grade")
    item: dict[str, Any] = Field(default_factory=dict, description="the prompt record: {{item.<field>}}")


class GraderRunMetadata(BaseModel):
    name: str
    type: str
    errors: list[str] = Field(description="why a (sub-)grader scored 0, if one failed")
    execution_time: float = Field(description="seconds")
    scores: dict[str, float] = Field(description="each sub-grader's score (a multi's), else the grader's")
    sandbox: str | None = Field(None, description="the sandbox python and code_output graders ran in")


class GraderRunOut(BaseModel):
    object: Literal["grader.run"] = "grader.run"
    reward: float
    metadata: GraderRunMetadata
    sub_rewards: dict[str, float]
