"""Models offered for training and inference (OpenAI `/v1/models` shape, plus what a base model is)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    kind: Literal["base", "adapter", "merged"] = "base"
    architecture: str | None = Field(None, description="base models: config.json's architecture")
    parameters: int | None = Field(None, description="base models: parameter count (safetensors weights)")
    size_bytes: int | None = Field(None, description="base models: bytes of weight files")
    run_id: str | None = Field(None, description="checkpoints: the run that exported it")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]
