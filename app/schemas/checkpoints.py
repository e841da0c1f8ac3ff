"""The checkpoint object of the API contract."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class CheckpointFile(BaseModel):
    path: str
    size: int
    sha256: str


class CheckpointOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["checkpoint"] = "checkpoint"
    run_id: str
    stage_index: int
    step: int
    kind: Literal["resume", "adapter", "merged", "reward_model"]
    files: list[CheckpointFile]
    metrics: dict[str, Any]
    is_best: bool
    size_bytes: int
    created_at: datetime
