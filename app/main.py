"""The FastAPI application: settings, database, blob store and broker wired once per app."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import APIRouter, FastAPI
from starlette.types import Scope

from app.broker import create_celery
from app.db.session import make_session_factory
from app.edge import (
    JSON_BODY_LIMIT,
    MULTIPART_OVERHEAD,
    AdmissionMiddleware,
    BodyLimitMiddleware,
    UrlGuardMiddleware,
)
from app.errors import install_error_handlers
from app.observability import RequestContextMiddleware, configure_logging
from app.polled import PolledReadsMiddleware
from app.routes import (
    checkpoints,
    dashboard,
    datasets,
    evals,
    files,
    fine_tuning,
    graders,
    inference,
    keys,
    metrics,
    models,
    ops,
    runs,
    stream,
    webhooks,
)
from app.services.auth import KeyCache
from app.services.snapshots import SnapshotCache
from app.settings import Settings, get_settings
from app.storage import LocalBlobStore, sweep_tmp_forever

log = logging.getLogger("tuneyard.api")

# Every router of the API; a new resource is one line here. A request is matched against the
# routes in this order, so the polled ones (run status, metrics) come first.
ROUTERS: list[APIRouter] = [
    runs.router,
    metrics.router,
    ops.router,
    models.router,
    datasets.router,
    dashboard.router,
    inference.router,
    evals.router,
    stream.router,
    checkpoints.router,
    graders.router,
    keys.router,
    files.router,
    fine_tuning.router,
    webhooks.router,
]

UPLOAD_PATHS = {"/v1/datasets", "/v1/files"}
# Threads beyond the admitted requests: SSE polls, in-process inference and the server itself.
API_SPARE_THREADS = 40


def create_app(settings: Settings | None = None) -> FastAPI:
    """Returns the API app for the settings (default: the process settings)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Sync handlers and dependencies each take a worker thread, one hop at a time, and a request's
        # session may hold a pooled connection between hops. With fewer threads than requests in
        # flight, every thread can end up waiting for a connection whose holder waits for a thread
        # (the API stalled at 100 connections). More threads than admitted requests
        # (app.edge.AdmissionMiddleware) means a hop never waits for a thread, so connection holders progress.
        anyio.to_thread.current_default_thread_limiter().total_tokens = (
            settings.api_max_concurrency + API_SPARE_THREADS
        )
        if not settings.auth_enabled:
            log.warning("authentication is OFF (TUNEYARD_AUTH_ENABLED=false): every request acts as "
                        "the team %r; never expose this server", "default")
        sweeper = asyncio.create_task(sweep_tmp_forever(app.state.store, settings.tmp_max_age_seconds))
        # What is alive now (modules, routes, schemas: ~140k objects) lives as long as the process.
        # Frozen, a full collection no longer walks it; unfrozen, each one paused every request in
        # flight for ~110 ms (bench/README.md, finding 6).
        gc.collect()
        gc.freeze()
        yield
        sweeper.cancel()
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
    app.state.keys = KeyCache(settings.auth_cache_seconds)
    app.state.snapshots = SnapshotCache(settings.api_snapshot_seconds)

    def body_limit(scope: Scope) -> int:
        if scope.get("method") == "POST" and scope.get("path") in UPLOAD_PATHS:
            return settings.max_upload_bytes + MULTIPART_OVERHEAD
        return JSON_BODY_LIMIT

    # Outermost last: request id and access log, then admission, then URL and body checks, then the
    # lane that answers run-status and metrics polls before routing.
    app.add_middleware(PolledReadsMiddleware, api=app)
    app.add_middleware(BodyLimitMiddleware, limit_for=body_limit,
                       stall_seconds=settings.api_body_timeout_seconds)
    app.add_middleware(UrlGuardMiddleware)
    app.add_middleware(AdmissionMiddleware, limit=settings.api_max_concurrency)
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
