"""Serving the API with uvicorn so that idle or slow clients cannot crowd out real requests.

Uvicorn's own `limit_concurrency` counts open connections, including ones that never sent a byte:
200 idle sockets made the API answer 503 to everyone. Here a connection must finish its request
headers within `api_header_timeout_seconds` of opening (or of the previous response) or it is
closed; admission counts requests in flight instead (app.edge.AdmissionMiddleware), so an idle
socket costs a file descriptor for a few seconds and nothing else.
"""

from __future__ import annotations

import asyncio

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.settings import Settings


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """httptools HTTP/1.1 with a deadline on every request's line and headers (slowloris, idle floods)."""

    header_timeout = 10.0  # set per server by `serve`
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_deadline()

    def on_headers_complete(self) -> None:
        self._disarm_header_deadline()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def serve(settings: Settings, host: str, port: int) -> None:
    """Runs the API until interrupted (the `tuneyard api` command)."""
    protocol = type("ConfiguredHeaderDeadlineProtocol", (HeaderDeadlineProtocol,),
                    {"header_timeout": settings.api_header_timeout_seconds})
    uvicorn.run("app.main:build_app", factory=True, host=host, port=port, log_config=None, access_log=False,
                http=protocol, timeout_keep_alive=5, timeout_graceful_shutdown=5)
