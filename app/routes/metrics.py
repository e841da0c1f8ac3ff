"""Metric series of a run, downsampled for long runs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.db.models import Run
from app.deps import CurrentTeam, SessionDep
from app.errors import error_responses
from app.schemas.metrics import MetricSeriesList
from app.services import metrics as service
from app.services.owned import get_owned

router = APIRouter(prefix="/v1/runs", tags=["runs"])

MAX_POINTS = 10_000


@router.get("/{run_id}/metrics", response_model=MetricSeriesList, responses=error_responses(401, 404, 422))
def get_metrics(
    run_id: str, session: SessionDep, team: CurrentTeam,
    stage: Annotated[int | None, Query(ge=0)] = None,
    split: Annotated[str | None, Query(max_length=20)] = None,
    names: Annotated[str | None, Query(max_length=2000, description="comma-separated metric names")] = None,
    after_step: Annotated[int | None, Query(ge=0)] = None,
    max_points: Annotated[int, Query(ge=2, le=MAX_POINTS)] = 1000,
) -> MetricSeriesList:
    run = get_owned(session, Run, team, run_id)
    wanted = [n.strip() for n in names.split(",") if n.strip()] if names else None
    return service.query_series(session, run.id, stage=stage, split=split, names=wanted,
                                after_step=after_step, max_points=max_points)
