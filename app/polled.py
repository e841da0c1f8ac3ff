"""The two most polled reads — a run's status and its metrics — answered before FastAPI's routing.

A dashboard or a script polling a run is the commonest request the service gets, and most polls
are answered from the snapshot cache (app.services.snapshots) without a query. What such a poll
then costs is the framework around it: cProfile of a cached `GET /v1/runs/{id}` put FastAPI's
route matching and dependency solving at ~60 % of its CPU (bench/README.md, finding 6). This lane
matches the two paths with one regular expression each and calls the same service functions the
routes call, behind the same edge middlewares (request id, access log, admission, URL and body
checks), so what a client sees is the same answer.

The routes in app/routes/runs.py and app/routes/metrics.py stay: they are what the OpenAPI document
describes, and they answer whatever this lane does not take — a metrics query that does not
validate (so the 422 is FastAPI's, with its field names), any method but GET, a trailing slash.
An API error (401, 404) gets the one error shape; any other exception goes to the handler the app
registered for it, or up to the request-context middleware's 500, as it would from a route.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI
from pydantic import ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from app.deps import bearer_key, team_of
from app.observability import ROUTE_PATH_KEY
from app.routes.metrics import series_query
from app.schemas.metrics import MetricsQuery
from app.services import metrics as metrics_service
from app.services import runs as runs_service

_RUN = re.compile(r"/v1/runs/([^/]+)")
_METRICS = re.compile(r"/v1/runs/([^/]+)/metrics")
RUN_ROUTE, METRICS_ROUTE = "/v1/runs/{run_id}", "/v1/runs/{run_id}/metrics"
_JSON = (b"content-type", b"application/json")


class PolledReadsMiddleware:
    def __init__(self, app: ASGIApp, api: FastAPI) -> None:
        self.app = app
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET" or not scope["path"].startswith("/v1/runs/"):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if (match := _RUN.fullmatch(path)) is not None:
            route, query = RUN_ROUTE, None
        elif (match := _METRICS.fullmatch(path)) is not None:
            route, query = METRICS_ROUTE, _metrics_query(scope)
            if query is None:
                await self.app(scope, receive, send)  # the route answers the 422
                return
        else:
            await self.app(scope, receive, send)
            return
        scope[ROUTE_PATH_KEY] = route  # the access log and the request metrics name the documented route
        try:
            body = await self._answer(scope, match[1], query)
        except Exception as exc:  # noqa: BLE001 - handed to the app's handler for it, or re-raised
            handler = _handler_for(self.api.exception_handlers, exc)
            if handler is None:
                raise
            response = await handler(Request(scope, receive), exc)
            await response(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode()), _JSON]})
        await send({"type": "http.response.body", "body": body})

    async def _answer(self, scope: Scope, run_id: str, query: MetricsQuery | None) -> bytes:
        state = self.api.state
        authorization = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        team = await team_of(state, bearer_key(authorization.decode("latin-1")))
        if query is None:
            return await runs_service.run_json(state.sessions, state.snapshots, team, run_id)
        return await metrics_service.metrics_json(state.sessions, state.snapshots, team, run_id,
                                                  series_query(query))


def _metrics_query(scope: Scope) -> MetricsQuery | None:
    """Returns the metrics query of the request, None when it does not validate (the route says why)."""
    raw = scope.get("query_string", b"")
    if not raw:
        return MetricsQuery()
    try:
        return MetricsQuery.model_validate(dict(parse_qsl(raw.decode("latin-1"), keep_blank_values=True)))
    except (ValidationError, ValueError):
        return None


def _handler_for(handlers: dict[Any, Any], exc: Exception) -> Any:
    """Returns the exception handler registered for the exception's class or its nearest base."""
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    return None
