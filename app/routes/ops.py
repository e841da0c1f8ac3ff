"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.deps import CeleryDep, SessionDep
from app.errors import error_responses
from app.observability import REGISTRY
from app.schemas.ops import Health, Readiness
from app.services.health import check_ready

router = APIRouter(tags=["ops"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    return Health()


@router.get("/readyz", response_model=Readiness, responses=error_responses(503))
def readyz(session: SessionDep, celery: CeleryDep) -> Readiness:
    check_ready(session, celery)
    return Readiness()


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
def metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
