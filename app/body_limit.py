"""Pure ASGI middleware that refuses request bodies over a limit before they reach the disk.

Starlette's multipart parser spools file parts to disk with no total limit, so the limit is
enforced here on the raw byte stream: a declared Content-Length over the limit is answered 413
at once, and a body that grows past it mid-stream raises PayloadTooLarge out of `receive`.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import PayloadTooLarge, error_payload

JSON_BODY_LIMIT = 16 * 1024 * 1024
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and small form fields around the file


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, limit_for: Callable[[Scope], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_413(send, limit)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
            return message

        await self.app(scope, counting_receive, send)


async def _send_413(send: Send, limit: int) -> None:
    import json

    body = json.dumps(error_payload(
        413, "payload_too_large", f"request body is larger than the limit of {limit} bytes"
    )).encode()
    await send({"type": "http.response.start", "status": 413, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
