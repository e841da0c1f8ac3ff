"""Eval jobs: the request, and the eval object with its side-by-side results."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from trainer_core.spec_base import MAX_SEED, InputModel

EvalStatus = Literal["queued", "running", "succeeded", "failed"]


class EvalGeneration(InputModel):
    """Generation parameters for metrics scored on completions (greedy by default)."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(128, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[Annotated[str, Field(max_length=200)]] = Field(default_factory=list, max_length=4)
    seed: int = Field(0, ge=0, le=MAX_SEED)


class EvalCreate(InputModel):
    model_config = ConfigDict(extra="forbid")

    models: list[Annotated[str, Field(min_length=1, max_length=400)]] = Field(
        min_length=1, max_length=8, description="base model names or checkpoint ids")
    dataset_id: str = Field(min_length=1, max_length=64)
    metrics: list[Annotated[str, Field(max_length=64)]] = Field(min_length=1, max_length=16)
    generation: EvalGeneration = Field(default_factory=EvalGeneration)
    max_examples: int | None = Field(None, ge=1, le=100_000, description="evaluate the first N records only")
    num_samples: int = Field(5, ge=0, le=100, description="generations kept per model for inspection")
    name: str | None = Field(None, max_length=200)


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
    generation: EvalGeneration
    max_examples: int | None
    progress: float
    results: EvalResults | None
    error: EvalError | None
    created_at: datetime
    finished_at: datetime | None
