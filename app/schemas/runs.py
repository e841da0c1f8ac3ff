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
