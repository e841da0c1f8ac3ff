"""The live stream of a run (Server-Sent Events): metrics, events and status, replayable by id.

The stream polls the database by id — no LISTEN/NOTIFY — and every message carries the cursor
`m<metric id>-e<event id>` of everything sent so far, so a client that reconnects with
`Last-Event-ID` gets exactly what it missed. Metric rows of a run have one writer (the fenced
worker) and so commit in id order; events have several (worker, API, reaper), so the stream
looks back `GAP_SECONDS` for an event whose transaction committed after a later id was sent.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Event, Metric, Run
from app.errors import Unprocessable
from app.jobs.states import RUN_STATES
from app.schemas.runs import EventOut

POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0
GAP_SECONDS = 10.0
BATCH = 500
_CURSOR = re.compile(r"^m(\d+)-e(\d+)$")


@dataclass
class StreamCursor:
    metric_id: int = 0
    event_id: int = 0
    # Event ids sent in the last GAP_SECONDS and the cursor as it was then: the look-back window.
    recent_events: dict[int, float] = field(default_factory=dict)
    lookback: list[tuple[float, int]] = field(default_factory=list)

    def token(self) -> str:
        return f"m{self.metric_id}-e{self.event_id}"

    @classmethod
    def parse(cls, value: str | None) -> StreamCursor:
        """Returns the cursor of a Last-Event-ID value (empty: from the start); 422 for a malformed one."""
        if not value:
            return cls()
        match = _CURSOR.match(value.strip())
        if match is None:
            raise Unprocessable(f"Last-Event-ID {value!r} is not a cursor of this stream (m<id>-e<id>)",
                                code="invalid_cursor", param="Last-Event-ID")
        return cls(int(match.group(1)), int(match.group(2)))


def sse_message(event: str, data: Any, event_id: str | None = None) -> str:
    """Returns one message in the text/event-stream wire format."""
    lines = [f"event: {event}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append(f"data: {json.dumps(data, separators=(',', ':'), default=str)}")
    return "\n".join(lines) + "\n\n"


@dataclass
class Poll:
    status: str
    run: dict[str, Any]
    messages: list[tuple[str, dict[str, Any]]]  # (event type, data), cursor already advanced
    tokens: list[str]
    full: bool


def poll_run(session: Session, run_id: str, cursor: StreamCursor) -> Poll:
    """Returns what the run has beyond the cursor (status read first, so a terminal poll is complete)."""
    from app.services.runs import run_out

    run = session.get(Run, run_id)
    assert run is not None
    status, run_json = run.status, run_out(run).model_dump(mode="json")
    metrics = session.scalars(select(Metric).where(Metric.run_id == run_id, Metric.id > cursor.metric_id)
                              .order_by(Metric.id).limit(BATCH)).all()
    now = time.monotonic()
    cursor.lookback = [(t, i) for t, i in cursor.lookback if now - t < GAP_SECONDS] + [(now, cursor.event_id)]
    cursor.recent_events = {i: t for i, t in cursor.recent_events.items() if now - t < GAP_SECONDS}
    floor = cursor.lookback[0][1]
    events = [e for e in session.scalars(select(Event).where(Event.run_id == run_id, Event.id > floor)
                                         .order_by(Event.id).limit(BATCH + len(cursor.recent_events)))
              if e.id not in cursor.recent_events][:BATCH]
    messages: list[tuple[str, dict[str, Any]]] = []
    tokens: list[str] = []
    for m in metrics:
        cursor.metric_id = m.id
        messages.append(("metrics", {"id": m.id, "stage_index": m.stage_index, "step": m.step,
                                     "split": m.split,
                                     "values": m.values}))
        tokens.append(cursor.token())
    for e in events:
        cursor.recent_events[e.id] = now
        cursor.event_id = max(cursor.event_id, e.id)
        messages.append(("event", EventOut.model_validate(e).model_dump(mode="json")))
        tokens.append(cursor.token())
    return Poll(status, run_json, messages, tokens, len(metrics) == BATCH or len(events) == BATCH)


def _run_signature(run: dict[str, Any]) -> tuple:
    stages = tuple((s["status"], s["step"], s["total_steps"]) for s in run["stages"])
    return run["status"], run["attempt"], stages


async def stream_run(sessions: sessionmaker[Session], run_id: str, cursor: StreamCursor,
                     poll_seconds: float = POLL_SECONDS) -> AsyncIterator[str]:
    """Yields SSE messages until the run is terminal and everything up to its end was sent."""

    def poll() -> Poll:
        with sessions() as session:
            return poll_run(session, run_id, cursor)

    yield f"retry: {int(poll_seconds * 2000)}\n\n"
    last_signature: tuple | None = None
    last_sent = time.monotonic()
    while True:
        result = await anyio.to_thread.run_sync(poll)
        for (kind, data), token in zip(result.messages, result.tokens, strict=True):
            yield sse_message(kind, data, token)
        signature = _run_signature(result.run)
        if signature != last_signature:
            yield sse_message("status", result.run, cursor.token())
            last_signature = signature
            last_sent = time.monotonic()
        elif result.messages:
            last_sent = time.monotonic()
        if result.status in RUN_STATES.terminal and not result.full:
            return
        if result.full:
            continue
        if time.monotonic() - last_sent >= KEEPALIVE_SECONDS:
            yield ": keepalive\n\n"
            last_sent = time.monotonic()
        await anyio.sleep(poll_seconds)
