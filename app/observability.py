"""Structured logs with a request id, Prometheus request metrics, and the 500 answer of last resort."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any, TextIO

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_payload

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
log = logging.getLogger("tuneyard.http")

REGISTRY = CollectorRegistry()
REQUESTS = Counter(
    "tuneyard_http_requests_total", "HTTP requests by route and status",
    ["method", "route", "status"], registry=REGISTRY,
)
LATENCY = Histogram(
    "tuneyard_http_request_duration_seconds", "HTTP request latency by route",
    ["method", "route"], registry=REGISTRY,
)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_control(text: str) -> str:
    """Returns the text with control characters written as escapes (`\n`, `\x00`), one line."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


class _EscapeControlFilter(logging.Filter):
    """Renders each record's message once, escaped: a newline in a logged path or name cannot forge
    a separate log line, and NUL or terminal escapes cannot reach a log reader."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        escaped = escape_control(message)
        if escaped != message or record.args:
            record.msg, record.args = escaped, None
        return True


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, extra fields."""

    _skip = set(vars(logging.makeLogRecord({}))) | {"request_id", "message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "request_id", None):
            out["request_id"] = record.request_id
        out.update({k: v for k, v in vars(record).items() if k not in self._skip})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def make_log_handler(json_lines: bool, stream: TextIO) -> logging.Handler:
    """Returns the service's log handler on `stream`: JSON lines or readable text, one line per record."""
    handler = logging.StreamHandler(stream)
    handler.addFilter(_EscapeControlFilter())
    handler.addFilter(_RequestIdFilter())
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    return handler


def configure_logging(json_lines: bool, level: int = logging.INFO) -> None:
    """Sets up the root logger: JSON lines or a readable text line, both with the request id."""
    root = logging.getLogger()
    root.handlers[:] = [make_log_handler(json_lines, sys.stderr)]
    root.setLevel(level)


# Set by a handler that answers before routing (app.polled): the documented route's path.
ROUTE_PATH_KEY = "tuneyard.route_path"


def _route_label(scope: Scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or scope.get(ROUTE_PATH_KEY) or "unmatched"


class RequestContextMiddleware:
    """Pure ASGI middleware: request id (X-Request-ID in and out), metrics, access log, and a 500
    with the error shape (no traceback) for any exception the app did not handle."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if 0 < len(incoming) <= 128 and incoming.isprintable() else uuid.uuid4().hex
        token = request_id_var.set(rid)
        scope.setdefault("state", {})["request_id"] = rid
        status = 500
        started = False
        begin = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            log.exception("unhandled %s on %s %s: %s", type(exc).__name__, scope["method"], scope["path"],
                          exc)
            if not started:
                body = json.dumps(error_payload(
                    500, "internal_error", f"internal server error; quote request id {rid} when reporting it"
                )).encode()
                await send_with_id({"type": "http.response.start", "status": 500, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send_with_id({"type": "http.response.body", "body": body})
        finally:
            elapsed = time.perf_counter() - begin
            route = _route_label(scope)
            REQUESTS.labels(scope["method"], route, str(status)).inc()
            LATENCY.labels(scope["method"], route).observe(elapsed)
            log.info("%s %s %s %.1fms", scope["method"], scope["path"], status, elapsed * 1000,
                     extra={"status": status, "route": route, "duration_ms": round(elapsed * 1000, 1)})
            request_id_var.reset(token)
