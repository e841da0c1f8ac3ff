"""OpenAI's files API: upload (multipart `file` + `purpose=fine-tune`), list, get, content, delete."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse

from app.deps import CeleryDep, CurrentTeam, SessionDep, SettingsDep, StoreDep
from app.errors import error_responses
from app.schemas.common import CURSOR_PATTERN, MAX_PAGE, OpenAIPage
from app.schemas.files import FileDeleted, FileOut
from app.services import datasets
from app.services import files as service

router = APIRouter(prefix="/v1/files", tags=["openai: files"])

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": ["file", "purpose"],
            "properties": {"file": {"type": "string", "format": "binary"},
                           "purpose": {"type": "string", "enum": [service.PURPOSE]}},
        }}},
    }
}


@router.post("", response_model=FileOut, openapi_extra=_UPLOAD_BODY,
             responses=error_responses(400, 401, 413, 415))
async def upload_file(request: Request, session: SessionDep, store: StoreDep, celery: CeleryDep,
                      settings: SettingsDep, team: CurrentTeam) -> FileOut:
    dataset = await service.upload_file(session, store, celery, team, chunks=request.stream(),
                                        content_type=request.headers.get("content-type", ""),
                                        max_bytes=settings.max_upload_bytes)
    return service.file_out(dataset)


@router.get("", response_model=OpenAIPage[FileOut], responses=error_responses(401, 422))
def list_files(
    session: SessionDep, team: CurrentTeam,
    purpose: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE * 100)] = 10000,
    after: Annotated[str | None, Query(max_length=64, pattern=CURSOR_PATTERN)] = None,
    order: Literal["asc", "desc"] = "desc",
) -> OpenAIPage[FileOut]:
    return service.list_files(session, team, purpose=purpose, limit=limit, after=after, order=order)


@router.get("/{file_id}", response_model=FileOut, responses=error_responses(401, 404))
def get_file(file_id: str, session: SessionDep, team: CurrentTeam) -> FileOut:
    return service.file_out(service.get_file(session, team, file_id))


@router.get("/{file_id}/content", response_class=FileResponse, responses=error_responses(401, 404))
def file_content(file_id: str, session: SessionDep, store: StoreDep, team: CurrentTeam) -> FileResponse:
    dataset = service.get_file(session, team, file_id)
    return FileResponse(store.path_for(dataset.blob_key), media_type="application/jsonl",
                        filename=dataset.name)


@router.delete("/{file_id}", response_model=FileDeleted, responses=error_responses(401, 404, 409))
def delete_file(file_id: str, session: SessionDep, store: StoreDep, team: CurrentTeam) -> FileDeleted:
    service.get_file(session, team, file_id)
    datasets.delete_dataset(session, store, team, file_id)
    return FileDeleted(id=file_id)
