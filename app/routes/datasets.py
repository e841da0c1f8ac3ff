"""Dataset routes: upload (multipart or raw JSONL), list, get, preview, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from app.db.models import Dataset
from app.deps import CeleryDep, CurrentTeam, SessionDep, SettingsDep, StoreDep
from app.errors import error_responses
from app.schemas.common import MAX_PAGE, Cursor, ListPage
from app.schemas.datasets import DatasetDeleted, DatasetOut, DatasetPreview
from app.services import datasets as service
from app.services.owned import get_owned

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {"type": "string", "format": "binary"},
                    "format": {"type": "string", "enum": [*service.FORMATS, "auto"]},
                    "name": {"type": "string", "maxLength": 300},
                    "purpose": {"type": "string", "description": "OpenAI SDK field; ignored"},
                },
            }},
            "application/jsonl": {"schema": {"type": "string", "format": "binary"}},
            "application/x-ndjson": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.post("", response_model=DatasetOut, status_code=201, openapi_extra=_UPLOAD_BODY,
             responses=error_responses(400, 401, 413, 415, 422))
async def upload_dataset(
    request: Request, session: SessionDep, store: StoreDep, celery: CeleryDep, settings: SettingsDep,
    team: CurrentTeam,
    format: Annotated[str | None, Query(description="sft|preference|prompts|trajectories|auto")] = None,
    name: Annotated[str | None, Query(max_length=300)] = None,
) -> DatasetOut:
    dataset = await service.upload_dataset(
        session, store, celery, team, chunks=request.stream(),
        content_type=request.headers.get("content-type", ""), max_bytes=settings.max_upload_bytes,
        format=format, name=name,
    )
    return DatasetOut.model_validate(dataset)


@router.get("", response_model=ListPage[DatasetOut], responses=error_responses(401, 422))
def list_datasets(
    session: SessionDep, team: CurrentTeam,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
    after: Cursor = None,
) -> ListPage[DatasetOut]:
    return service.list_datasets(session, team, limit=limit, after=after)


@router.get("/{dataset_id}", response_model=DatasetOut, responses=error_responses(401, 404))
def get_dataset(dataset_id: str, session: SessionDep, team: CurrentTeam) -> DatasetOut:
    return DatasetOut.model_validate(get_owned(session, Dataset, team, dataset_id))


@router.get("/{dataset_id}/preview", response_model=DatasetPreview, responses=error_responses(401, 404, 422))
def preview_dataset(
    dataset_id: str, session: SessionDep, store: StoreDep, team: CurrentTeam,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> DatasetPreview:
    dataset = get_owned(session, Dataset, team, dataset_id)
    return DatasetPreview(dataset_id=dataset.id, data=service.preview_dataset(store, dataset, limit))


@router.delete("/{dataset_id}", response_model=DatasetDeleted, responses=error_responses(401, 404, 409))
def delete_dataset(
    dataset_id: str, session: SessionDep, store: StoreDep, team: CurrentTeam
) -> DatasetDeleted:
    service.delete_dataset(session, store, team, dataset_id)
    return DatasetDeleted(id=dataset_id)
