"""Metric series of a run, downsampled for long runs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from app.deps import BEARER_SECURITY, polled_team
from app.errors import error_responses
from app.schemas.metrics import MetricSeriesList
from app.services import metrics as service

router = APIRouter(prefix="/v1/runs", tags=["runs"])

MAX_POINTS = 10_000


@router.get("/{run_id}/metrics", response_model=MetricSeriesList, responses=error_responses(401, 404, 422),
            openapi_extra=BEARER_SECURITY)
async def get_metrics(
    run_id: str, request: Request,
    stage: Annotated[int | None, Query(ge=0)] = None,
    split: Annotated[str | None, Query(max_length=20)] = None,
    names: Annotated[str | None, Query(max_length=2000, description="comma-separated metric names")] = None,
    after_step: Annotated[int | None, Query(ge=0)] = None,
    max_points: Annotated[int, Query(ge=2, le=MAX_POINTS)] = 1000,
) -> Response:
    # async, no dependency, and answered from the snapshot cache while the run has not moved: no
    # thread hop, no query
    wanted = tuple(n.strip() for n in names.split(",") if n.strip()) if names else None
    query = service.SeriesQuery(stage=stage, split=split, names=wanted or None, after_step=after_step,
                                max_points=max_points)
    state, team = request.app.state, await polled_team(request)
    return Response(await service.metrics_json(state.sessions, state.snapshots, team, run_id, query),
                    media_type="application/json")
