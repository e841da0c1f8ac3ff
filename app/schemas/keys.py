"""API keys as the API shows them: never the key itself, only its first characters."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ApiKeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["api_key"] = "api_key"
    name: str = Field(description="the label given at creation")
    prefix: str = Field(description="the key's first characters, to tell keys apart")
    created_at: datetime
    last_used_at: datetime | None = Field(
        description="when the key was last used (written at most once a minute)")
    revoked_at: datetime | None = Field(description="when the key was revoked; a revoked key answers 401")
