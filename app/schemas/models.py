"""Models offered for training and inference (OpenAI `/v1/models` shape)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    kind: Literal["base", "adapter", "merged"] = "base"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]
