"""The FastAPI application: settings, database, blob store and broker wired once per app."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI
from starlette.types import Scope

from app.body_limit import JSON_BODY_LIMIT, MULTIPART_OVERHEAD, BodyLimitMiddleware
from app.broker import create_celery
from app.db.session import make_session_factory
from app.errors import install_error_handlers
from app.observability import RequestContextMiddleware, configure_logging
from app.routes import checkpoints, dashboard, datasets, evals, inference, metrics, models, ops, runs, stream
from app.settings import Settings, get_settings
from app.storage import LocalBlobStore

log = logging.getLogger("tuneyard.api")

# Every router of the API; a new resource is one line here.
ROUTERS: list[APIRouter] = [
    ops.router,
    models.router,
    datasets.router,
    runs.router,
    dashboard.router,
    inference.router,
    evals.router,
    metrics.router,
    stream.router,
    checkpoints.router,
]

UPLOAD_PATHS = {"/v1/datasets", "/v1/files"}


def create_app(settings: Settings | None = None) -> FastAPI:
    """Returns the API app for the settings (default: the process settings)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.auth_enabled:
            log.warning("authentication is OFF (TUNEYARD_AUTH_ENABLED=false): every request acts as "
                        "the team %r; never expose this server", "default")
        yield
        app.state.sessions.kw["bind"].dispose()

    app = FastAPI(
        title="Tuneyard",
        version="0.1.0",
        description="Training-as-a-service: datasets, multi-stage LoRA runs, checkpoints, inference.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.sessions = make_session_factory(settings)
    app.state.store = LocalBlobStore(settings.storage_dir)
    app.state.celery = create_celery(settings)

    def body_limit(scope: Scope) -> int:
        if scope.get("method") == "POST" and scope.get("path") in UPLOAD_PATHS:
            return settings.max_upload_bytes + MULTIPART_OVERHEAD
        return JSON_BODY_LIMIT

    app.add_middleware(BodyLimitMiddleware, limit_for=body_limit)
    app.add_middleware(RequestContextMiddleware)
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    return app


def build_app() -> FastAPI:
    """Uvicorn factory (`uvicorn app.main:build_app --factory`): logs configured from the settings."""
    settings = get_settings()
    configure_logging(settings.log_json)
    return create_app(settings)
