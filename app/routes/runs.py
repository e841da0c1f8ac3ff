"""Run routes: create, list, get, cancel, resume, events."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response

from app.deps import (
    BEARER_SECURITY,
    CeleryDep,
    CurrentTeam,
    SessionDep,
    SettingsDep,
    SnapshotsDep,
    polled_team,
)
from app.errors import error_responses
from app.schemas.common import MAX_PAGE, Cursor, ListPage
from app.schemas.runs import EventOut, RunOut, RunStatus
from app.services import runs as service
from trainer_core.config import RunSpec

router = APIRouter(prefix="/v1/runs", tags=["runs"])


@router.post("", response_model=RunOut, status_code=201, responses=error_responses(401, 409, 413, 422))
def create_run(
    spec: RunSpec, response: Response, session: SessionDep, settings: SettingsDep, celery: CeleryDep,
    team: CurrentTeam,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> RunOut:
    run, created = service.create_run(session, settings, celery, team, spec, idempotency_key)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return service.run_out(run)


@router.get("", response_model=ListPage[RunOut], responses=error_responses(401, 422))
def list_runs(
    session: SessionDep, team: CurrentTeam,
    status: RunStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
    after: Cursor = None,
) -> ListPage[RunOut]:
    return service.list_runs(session, team, status=status, limit=limit, after=after)


@router.get("/{run_id}", response_model=RunOut, responses=error_responses(401, 404),
            openapi_extra=BEARER_SECURITY)
async def get_run(run_id: str, request: Request) -> Response:
    # async, no dependency, and answered from the snapshot cache on most polls: no thread hop, no query
    state, team = request.app.state, await polled_team(request)
    return Response(await service.run_json(state.sessions, state.snapshots, team, run_id),
                    media_type="application/json")


@router.post("/{run_id}/cancel", response_model=RunOut, responses=error_responses(401, 404, 409))
def cancel_run(run_id: str, session: SessionDep, snapshots: SnapshotsDep, team: CurrentTeam) -> RunOut:
    return service.run_out(service.cancel_run(session, snapshots, team, run_id))


@router.post("/{run_id}/resume", response_model=RunOut, responses=error_responses(401, 404, 409))
def resume_run(run_id: str, session: SessionDep, snapshots: SnapshotsDep, settings: SettingsDep,
               celery: CeleryDep, team: CurrentTeam) -> RunOut:
    """Queues a failed or cancelled run again; it continues from its last complete checkpoint."""
    return service.run_out(service.resume_run(session, snapshots, settings, celery, team, run_id))


@router.get("/{run_id}/events", response_model=ListPage[EventOut], responses=error_responses(401, 404, 422))
def list_events(
    run_id: str, session: SessionDep, team: CurrentTeam,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    after: Annotated[int | None, Query(ge=0, le=2**62)] = None,
) -> ListPage[EventOut]:
    return service.list_events(session, team, run_id, limit=limit, after=after)
