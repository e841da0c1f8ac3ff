"""The dataset object of the API contract."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class DatasetError(BaseModel):
    line: int | None = None
    field: str | None = None
    message: str


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["dataset"] = "dataset"
    name: str
    format: str | None
    status: Literal["validating", "ready", "invalid"]
    num_records: int | None
    size_bytes: int
    sha256: str
    stats: dict[str, Any]
    errors: list[DatasetError]
    created_at: datetime
    validated_at: datetime | None = None


class DatasetPreview(BaseModel):
    object: Literal["list"] = "list"
    dataset_id: str
    data: list[Any]


class DatasetDeleted(BaseModel):
    id: str
    object: Literal["dataset"] = "dataset"
    deleted: bool = True
