"""Checkpoints: per run, one by id, one file (HTTP Range), or the whole folder as a streamed tar."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, StreamingResponse

from app.deps import CurrentTeam, SessionDep, StoreDep
from app.errors import error_responses
from app.schemas.checkpoints import CheckpointOut
from app.schemas.common import MAX_PAGE, Cursor, ListPage
from app.services import checkpoints as service

router = APIRouter(tags=["checkpoints"])


@router.get("/v1/runs/{run_id}/checkpoints", response_model=ListPage[CheckpointOut],
            responses=error_responses(401, 404, 422))
def list_checkpoints(
    run_id: str, session: SessionDep, team: CurrentTeam,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    after: Cursor = None,
) -> ListPage[CheckpointOut]:
    return service.list_checkpoints(session, team, run_id, limit=limit, after=after)


@router.get("/v1/checkpoints/{checkpoint_id}", response_model=CheckpointOut,
            responses=error_responses(401, 404))
def get_checkpoint(checkpoint_id: str, session: SessionDep, team: CurrentTeam) -> CheckpointOut:
    return CheckpointOut.model_validate(service.get_checkpoint(session, team, checkpoint_id))


@router.get("/v1/checkpoints/{checkpoint_id}/files/{path:path}", response_class=FileResponse,
            responses=error_responses(401, 404))
def download_file(checkpoint_id: str, path: str, session: SessionDep, store: StoreDep,
                  team: CurrentTeam) -> FileResponse:
    checkpoint = service.get_checkpoint(session, team, checkpoint_id)
    file = service.checkpoint_file(store, checkpoint, path)
    return FileResponse(file, media_type="application/octet-stream", filename=file.name)


@router.get("/v1/checkpoints/{checkpoint_id}/archive", response_class=StreamingResponse,
            responses=error_responses(401, 404))
def download_archive(checkpoint_id: str, session: SessionDep, store: StoreDep,
                     team: CurrentTeam) -> StreamingResponse:
    checkpoint = service.get_checkpoint(session, team, checkpoint_id)
    return StreamingResponse(service.archive_chunks(store, checkpoint), media_type="application/x-tar",
                             headers={"Content-Disposition": f'attachment; filename="{checkpoint.id}.tar"'})
