"""Eval jobs: the request, and the eval object with its side-by-side results."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from trainer_core.config import SamplingParams
from trainer_core.eval_metrics import EVAL_SAMPLING, EVAL_SAMPLING_DEFAULTS
from trainer_core.spec_base import InputModel

EvalStatus = Literal["queued", "running", "succeeded", "failed"]


class EvalCreate(InputModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    models: list[Annotated[str, Field(min_length=1, max_length=400)]] = Field(
        min_length=1, max_length=8, description="base model names or checkpoint ids")
    dataset_id: str = Field(min_length=1, max_length=64)
    metrics: list[Annotated[str, Field(max_length=64)]] = Field(min_length=1, max_length=16)
    generation: SamplingParams = Field(
        EVAL_SAMPLING,
        description="generation for metrics scored on completions; fields left out take the eval defaults "
        "max_tokens 128, temperature 0 (greedy), seed 0 (sample i uses seed + i); n must be 1",
    )
    max_examples: int | None = Field(None, ge=1, le=100_000, description="evaluate the first N records only")
    num_samples: int = Field(5, ge=0, le=100, description="generations kept per model for inspection")
    name: str | None = Field(None, max_length=200)

    @field_validator("generation", mode="before")
    @classmethod
    def _eval_defaults(cls, value: Any) -> Any:
        return {**EVAL_SAMPLING_DEFAULTS, **value} if isinstance(value, dict) else value

    @field_validator("generation")
    @classmethod
    def _one_completion(cls, value: SamplingParams) -> SamplingParams:
        if value.n != 1:
            raise ValueError("generation.n must be 1: an eval scores one completion per prompt")
        return value


class ModelResult(BaseModel):
    """One model's metrics on the eval's records, and its first generations."""

    model: str
    metrics: dict[str, float]
    num_examples: int
    samples: list[dict[str, Any]] = []


class EvalResults(BaseModel):
    """`table`: one row per model, `{model, <metric>: value, ...}`, for a side-by-side view."""

    table: list[dict[str, Any]]
    models: list[ModelResult]


class EvalError(BaseModel):
    type: str
    message: str
    model: str | None = None


class EvalOut(BaseModel):
    id: str
    object: Literal["eval"] = "eval"
    name: str | None
    status: EvalStatus
    models: list[str]
    dataset_id: str
    metrics: list[str]
    generation: SamplingParams
    max_examples: int | None
    progress: float
    results: EvalResults | None
    error: EvalError | None
    created_at: datetime
    finished_at: datetime | None
