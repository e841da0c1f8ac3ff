"""OpenAI's fine-tuning API: jobs (create, list, get, cancel, pause, resume), events, checkpoints."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Query, Request

from app.deps import CeleryDep, CurrentTeam, SessionDep, SettingsDep, SnapshotsDep
from app.errors import error_responses
from app.schemas.common import CURSOR_PATTERN, MAX_PAGE, OpenAIPage
from app.schemas.fine_tuning import JobCheckpointOut, JobCreate, JobEventOut, JobOut
from app.services import fine_tuning as service
from app.services import fine_tuning_objects as objects

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["openai: fine-tuning"])

_METADATA_PARAM = re.compile(r"^metadata\[(.+)\]$")
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE)]
After = Annotated[str | None, Query(max_length=64, pattern=CURSOR_PATTERN)]


@router.post("", response_model=JobOut, responses=error_responses(400, 401, 422))
def create_job(body: JobCreate, session: SessionDep, settings: SettingsDep, celery: CeleryDep,
               team: CurrentTeam) -> JobOut:
    return objects.job_out(session, service.create_job(session, settings, celery, team, body))


@router.get("", response_model=OpenAIPage[JobOut], responses=error_responses(401, 422))
def list_jobs(request: Request, session: SessionDep, team: CurrentTeam, limit: Limit = 20,
              after: After = None) -> OpenAIPage[JobOut]:
    """`metadata[k]=v` (repeatable) keeps the jobs whose metadata holds every such pair."""
    metadata = {m[1]: v for k, v in request.query_params.multi_items() if (m := _METADATA_PARAM.match(k))}
    return objects.list_jobs(session, team, limit=limit, after=after, metadata=metadata)


@router.get("/{job_id}", response_model=JobOut, responses=error_responses(401, 404))
def get_job(job_id: str, session: SessionDep, team: CurrentTeam) -> JobOut:
    return objects.job_out(session, service.get_job(session, team, job_id))


@router.post("/{job_id}/cancel", response_model=JobOut, responses=error_responses(401, 404, 409))
def cancel_job(job_id: str, session: SessionDep, snapshots: SnapshotsDep, team: CurrentTeam) -> JobOut:
    return objects.job_out(session, service.cancel_job(session, snapshots, team, job_id))


@router.post("/{job_id}/pause", response_model=JobOut, responses=error_responses(401, 404, 409))
def pause_job(job_id: str, session: SessionDep, snapshots: SnapshotsDep, team: CurrentTeam) -> JobOut:
    """Stops the job's run at a checkpoint; the job reads `paused` until resumed or cancelled."""
    return objects.job_out(session, service.pause_job(session, snapshots, team, job_id))


@router.post("/{job_id}/resume", response_model=JobOut, responses=error_responses(401, 404, 409))
def resume_job(job_id: str, session: SessionDep, snapshots: SnapshotsDep, settings: SettingsDep,
               celery: CeleryDep, team: CurrentTeam) -> JobOut:
    return objects.job_out(session, service.resume_job(session, snapshots, settings, celery, team, job_id))


@router.get("/{job_id}/events", response_model=OpenAIPage[JobEventOut],
            responses=error_responses(401, 404, 422))
def list_events(job_id: str, session: SessionDep, team: CurrentTeam, limit: Limit = 20,
                after: Annotated[str | None, Query(max_length=64)] = None) -> OpenAIPage[JobEventOut]:
    """The run's events and metrics, newest first (as OpenAI lists them)."""
    return objects.list_job_events(session, team, job_id, limit=limit, after=after)


@router.get("/{job_id}/checkpoints", response_model=OpenAIPage[JobCheckpointOut],
            responses=error_responses(401, 404, 422))
def list_checkpoints(job_id: str, session: SessionDep, team: CurrentTeam, limit: Limit = 10,
                     after: After = None) -> OpenAIPage[JobCheckpointOut]:
    return objects.list_job_checkpoints(session, team, job_id, limit=limit, after=after)
