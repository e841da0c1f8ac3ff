"""The live stream of a run: Server-Sent Events with metrics, events and status."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from app.db.models import Run
from app.deps import CurrentTeam, SessionDep
from app.errors import error_responses
from app.services.events import StreamCursor, stream_run
from app.services.owned import get_owned

router = APIRouter(prefix="/v1/runs", tags=["runs"])


@router.get("/{run_id}/stream", response_class=StreamingResponse, responses={
    200: {"content": {"text/event-stream": {}}, "description": "metrics, event and status messages"},
    **error_responses(401, 404, 422)})
def stream(
    run_id: str, request: Request, session: SessionDep, team: CurrentTeam,
    last_event_id: Annotated[str | None, Header(max_length=100)] = None,
    after: Annotated[str | None, Query(max_length=100, description="cursor, for clients that cannot "
                                                                 "set Last-Event-ID")] = None,
) -> StreamingResponse:
    run = get_owned(session, Run, team, run_id)
    session.close()  # the stream polls with short sessions of its own; hold no connection while it lasts
    cursor = StreamCursor.parse(last_event_id or after)
    return StreamingResponse(stream_run(request.app.state.sessions, run.id, cursor),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
