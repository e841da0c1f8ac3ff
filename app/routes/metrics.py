"""Metric series of a run, downsampled for long runs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from app.deps import BEARER_SECURITY, polled_team
from app.errors import error_responses
from app.schemas.metrics import MetricSeriesList, MetricsQuery
from app.services import metrics as service

router = APIRouter(prefix="/v1/runs", tags=["runs"])


@router.get("/{run_id}/metrics", response_model=MetricSeriesList, responses=error_responses(401, 404, 422),
            openapi_extra=BEARER_SECURITY)
async def get_metrics(run_id: str, request: Request, query: Annotated[MetricsQuery, Query()]) -> Response:
    # Most polls are answered before routing by app.polled (the same service call); this route is
    # the documented one, and answers what that lane leaves to it (a query that does not validate).
    state, team = request.app.state, await polled_team(request)
    body = await service.metrics_json(state.sessions, state.snapshots, team, run_id, series_query(query))
    return Response(body, media_type="application/json")


def series_query(query: MetricsQuery) -> service.SeriesQuery:
    return service.SeriesQuery(stage=query.stage, split=query.split, names=query.wanted_names(),
                               after_step=query.after_step, max_points=query.max_points)
