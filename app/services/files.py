"""OpenAI's files API over datasets: a file is a dataset, its id is the dataset's id.

Uploads go through the same streamed, size-limited storage and off-request validation as
`POST /v1/datasets` (the format is detected from the records). Status: `validating` → `uploaded`,
`ready` → `processed`, `invalid` → `error` with the first line-numbered errors in `status_details`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Dataset, Team
from app.schemas.common import OpenAIPage
from app.schemas.files import FileOut
from app.services import datasets
from app.services.owned import get_owned
from app.services.pagination import paginate
from app.storage import BlobStore

PURPOSE = "fine-tune"
FILE_STATUS = {"validating": "uploaded", "ready": "processed", "invalid": "error"}
DETAILED_ERRORS = 5


def error_lines(errors: list[dict[str, Any]], limit: int = DETAILED_ERRORS) -> str:
    """Returns validation errors as `line N, field: message` text, the first `limit` of them."""
    parts = []
    for error in errors[:limit]:
        where = ", ".join(p for p in (f"line {error['line']}" if error.get("line") else None,
                                      error.get("field")) if p)
        parts.append(f"{where}: {error['message']}" if where else error["message"])
    more = len(errors) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def file_out(dataset: Dataset) -> FileOut:
    details = None
    if dataset.status == "invalid":
        total = (dataset.stats or {}).get("num_errors", len(dataset.errors))
        details = f"{total} invalid record(s): {error_lines(dataset.errors)}"
    return FileOut(id=dataset.id, bytes=dataset.size_bytes, created_at=int(dataset.created_at.timestamp()),
                   filename=dataset.name, status=FILE_STATUS[dataset.status], status_details=details)


async def upload_file(session: Session, store: BlobStore, celery: Celery, team: Team, *,
                      chunks: AsyncIterator[bytes], content_type: str, max_bytes: int) -> Dataset:
    """Returns the new dataset of a multipart upload whose `purpose` is `fine-tune` (else 400)."""
    return await datasets.upload_dataset(session, store, celery, team, chunks=chunks,
                                         content_type=content_type, max_bytes=max_bytes, format=None,
                                         name=None, purpose=PURPOSE)


def list_files(session: Session, team: Team, *, purpose: str | None, limit: int, after: str | None,
               order: str) -> OpenAIPage[FileOut]:
    """Returns the team's files (every dataset is a `fine-tune` file), newest first unless `order=asc`."""
    if purpose is not None and purpose != PURPOSE:
        return OpenAIPage[FileOut](data=[], has_more=False)
    stmt = select(Dataset).where(Dataset.team_id == team.id)
    rows, has_more, _ = paginate(session, stmt, Dataset.id, limit=limit, after=after,
                                 newest_first=order != "asc")
    data = [file_out(d) for d in rows]
    return OpenAIPage[FileOut](data=data, has_more=has_more, first_id=data[0].id if data else None,
                               last_id=data[-1].id if data else None)


def get_file(session: Session, team: Team, file_id: str) -> Dataset:
    """Returns the team's dataset behind a file id; 404 naming the file otherwise."""
    return get_owned(session, Dataset, team, file_id)
