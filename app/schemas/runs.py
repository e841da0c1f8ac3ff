"""The run object of the API contract (the request body is trainer_core's RunSpec)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from app.schemas.metrics import ProgressOut

RunStatus = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]


class StageOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    index: int
    method: str
    status: str
    step: int
    total_steps: int | None
    started_at: datetime | None
    finished_at: datetime | None


class RunOut(BaseModel):
    id: str
    object: Literal["run"] = "run"
    name: str | None
    status: RunStatus
    base_model: str
    spec: dict[str, Any]
    stages: list[StageOut]
    progress: ProgressOut
    attempt: int
    error: dict[str, Any] | None
    # trainer_core.estimate.FitEstimate: peak_memory_bytes_per_device, tokens_per_step, step_seconds,
    # devices, per-stage memory breakdown; None when the base model's config could not be read.
    estimate: dict[str, Any] | None = None
    # Why a queued run is not starting (no live worker can hold it), None otherwise.
    waiting_reason: str | None = None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class EventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    object: Literal["run.event"] = "run.event"
    run_id: str
    attempt: int
    kind: str
    level: str
    message: str
    data: dict[str, Any] | None
    created_at: datetime
