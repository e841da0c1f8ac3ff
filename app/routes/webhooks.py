"""Webhook endpoints, as OpenAI's webhook-endpoint API (`client.webhooks`), and their deliveries."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.deps import CurrentTeam, SessionDep, SettingsDep
from app.errors import error_responses
from app.schemas.common import CURSOR_PATTERN, MAX_PAGE, OpenAIPage
from app.schemas.webhooks import (
    DeliveryOut,
    EndpointCreate,
    EndpointDeleted,
    EndpointOut,
    EndpointTest,
    EndpointUpdate,
    EndpointWithSecret,
    EventTypeList,
    RotateSecret,
    TestResult,
)
from app.services import webhooks as service
from app.services.outbox import EVENT_TYPES

router = APIRouter(prefix="/v1", tags=["webhooks"])

Limit = Annotated[int, Query(ge=1, le=MAX_PAGE)]
After = Annotated[str | None, Query(max_length=64, pattern=CURSOR_PATTERN)]


@router.post("/webhook_endpoints", response_model=EndpointWithSecret, responses=error_responses(401, 422))
def create_endpoint(body: EndpointCreate, session: SessionDep, team: CurrentTeam) -> EndpointWithSecret:
    """Creates an endpoint; the signing secret is in this answer only (and in rotate_secret's)."""
    return service.with_secret(service.create_endpoint(session, team, body))


@router.get("/webhook_endpoints", response_model=OpenAIPage[EndpointOut], responses=error_responses(401, 422))
def list_endpoints(session: SessionDep, team: CurrentTeam, limit: Limit = 20,
                   after: After = None) -> OpenAIPage[EndpointOut]:
    return service.list_endpoints(session, team, limit=limit, after=after)


@router.get("/webhook_endpoints/{endpoint_id}", response_model=EndpointOut,
            responses=error_responses(401, 404))
def get_endpoint(endpoint_id: str, session: SessionDep, team: CurrentTeam) -> EndpointOut:
    return service.endpoint_out(service.get_endpoint(session, team, endpoint_id))


@router.post("/webhook_endpoints/{endpoint_id}", response_model=EndpointOut,
             responses=error_responses(401, 404, 422))
def update_endpoint(endpoint_id: str, body: EndpointUpdate, session: SessionDep,
                    team: CurrentTeam) -> EndpointOut:
    return service.endpoint_out(service.update_endpoint(session, team, endpoint_id, body))


@router.delete("/webhook_endpoints/{endpoint_id}", response_model=EndpointDeleted,
               responses=error_responses(401, 404))
def delete_endpoint(endpoint_id: str, session: SessionDep, team: CurrentTeam) -> EndpointDeleted:
    service.delete_endpoint(session, team, endpoint_id)
    return EndpointDeleted(id=endpoint_id)


@router.post("/webhook_endpoints/{endpoint_id}/rotate_secret", response_model=EndpointWithSecret,
             responses=error_responses(401, 404, 422))
def rotate_secret(endpoint_id: str, session: SessionDep, team: CurrentTeam,
                  body: RotateSecret | None = None) -> EndpointWithSecret:
    keep_old = body.keep_old_secret_active_for_24_hours if body else False
    return service.with_secret(service.rotate_secret(session, team, endpoint_id, keep_old))


@router.post("/webhook_endpoints/{endpoint_id}/test", response_model=TestResult,
             responses=error_responses(401, 404, 422))
def test_endpoint(endpoint_id: str, body: EndpointTest, session: SessionDep, settings: SettingsDep,
                  team: CurrentTeam) -> TestResult:
    """Sends one signed sample event now and returns the receiver's status code."""
    timeout = settings.webhook_timeout_seconds
    return service.test_endpoint(session, team, endpoint_id, body.event_type, timeout)


@router.get("/webhook_endpoints/{endpoint_id}/deliveries", response_model=OpenAIPage[DeliveryOut],
            responses=error_responses(401, 404, 422))
def list_deliveries(endpoint_id: str, session: SessionDep, team: CurrentTeam, limit: Limit = 20,
                    after: After = None) -> OpenAIPage[DeliveryOut]:
    """Every delivery to the endpoint with each attempt (time, duration, status code or error)."""
    return service.list_deliveries(session, team, endpoint_id, limit=limit, after=after)


@router.get("/webhook_event_types", response_model=EventTypeList, responses=error_responses(401))
def list_event_types(team: CurrentTeam) -> EventTypeList:
    return EventTypeList(data=list(EVENT_TYPES))
