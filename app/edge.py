"""Pure ASGI middleware at the API's edge: what a request may be before any route sees it.

- AdmissionMiddleware: at most N requests in flight; more get 503 with Retry-After at once.
  Requests are counted, not connections (an idle socket is not a request).
- UrlGuardMiddleware: control characters (NUL, newlines, ...) in the decoded path or query are a
  400. No id, cursor or name legitimately holds one; PostgreSQL text cannot hold NUL, and a
  newline in a logged path forges a log line.
- BodyLimitMiddleware: a declared Content-Length over the route's limit is a 413 at once; a body
  that grows past it mid-stream raises a 413 out of `receive`; a body that stalls longer than the
  body timeout between chunks raises a 408. Starlette's multipart parser spools files with no
  total limit, so the limit lives here on the raw byte stream. (Both are HTTPExceptions: FastAPI
  re-raises those from a body read, where any other error would become "error parsing the body".)
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from urllib.parse import unquote_to_bytes

import anyio
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_payload

# JSON bodies are small; bounding them before parsing bounds the CPU and memory a hostile one costs.
JSON_BODY_LIMIT = 1024 * 1024
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and small form fields around the file
RETRY_AFTER_SECONDS = "1"
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


async def send_error(send: Send, status: int, code: str, message: str, param: str | None = None,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Sends a complete error response with the one error shape, closing the connection."""
    body = json.dumps(error_payload(status, code, message, param)).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class AdmissionMiddleware:
    """Serves at most `limit` HTTP requests at once; the rest get 503 without queueing."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            await send_error(send, 503, "server_busy",
                             f"the API is serving its limit of {self.limit} requests; retry shortly",
                             headers=[(b"retry-after", RETRY_AFTER_SECONDS.encode())])
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class UrlGuardMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for part, raw in (("path", scope["path"].encode("utf-8", "surrogatepass")),
                              ("query", unquote_to_bytes(scope.get("query_string", b"")))):
                if _CONTROL.search(raw):
                    await send_error(send, 400, "control_character",
                                     f"the request {part} contains a control character (such as NUL or "
                                     "a newline); ids, cursors and names never hold one", param=part)
                    return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, limit_for: Callable[[Scope], int], stall_seconds: float) -> None:
        self.app = app
        self.limit_for = limit_for
        self.stall_seconds = stall_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await send_error(send, 413, "payload_too_large",
                             f"request body is larger than the limit of {limit} bytes")
            return
        received = 0
        body_done = False

        async def guarded_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # after the body, receive() waits for a disconnect: no deadline then
                return await receive()
            with anyio.move_on_after(self.stall_seconds) as waited:
                message = await receive()
            if waited.cancelled_caught:
                raise HTTPException(408, f"the request body stalled for more than {self.stall_seconds:g} s; "
                                         "send it without pauses")
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > limit:
                    raise HTTPException(413, f"request body is larger than the limit of {limit} bytes")
            return message

        await self.app(scope, guarded_receive, send)
