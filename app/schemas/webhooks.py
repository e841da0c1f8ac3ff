"""Webhook endpoints in the shape of OpenAI's webhook-endpoint API, and their delivery records."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EndpointCreate(_Request):
    url: HttpUrl
    event_types: list[str] = Field(min_length=1, max_length=64)
    name: str = Field(min_length=1, max_length=200)


class EndpointUpdate(_Request):
    url: HttpUrl | None = None
    event_types: list[str] | None = Field(None, min_length=1, max_length=64)
    name: str | None = Field(None, min_length=1, max_length=200)


class RotateSecret(_Request):
    keep_old_secret_active_for_24_hours: bool = False


class EndpointTest(_Request):
    event_type: str


class EndpointOut(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    created_at: int
    event_types: list[str]
    name: str
    signing_secret_hint: str | None = None
    url: str
    updated_at: int | None = None


class EndpointWithSecret(EndpointOut):
    signing_secret: str = Field(description="shown only here, on create and on rotate_secret")


class EndpointDeleted(BaseModel):
    id: str
    object: Literal["webhook_endpoint.deleted"] = "webhook_endpoint.deleted"
    deleted: bool = True


class TestResult(BaseModel):
    object: Literal["webhook_endpoint.test"] = "webhook_endpoint.test"
    event_type: str
    status_code: int
    success: Literal[True] = True
    webhook_endpoint_id: str


class EventTypeList(BaseModel):
    object: Literal["list"] = "list"
    data: list[str]


class AttemptOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    number: int
    started_at: int
    duration_ms: int
    status_code: int | None
    error: str | None


class DeliveryOut(BaseModel):
    id: str
    object: Literal["webhook_delivery"] = "webhook_delivery"
    webhook_endpoint_id: str
    event_id: str = Field(description="the `webhook-id` header of every attempt")
    event_type: str
    status: Literal["pending", "delivered", "failed"]
    attempts: list[AttemptOut]
    next_attempt_at: int | None
    delivered_at: int | None
    created_at: int
