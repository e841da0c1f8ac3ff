"""Datasets: upload (streamed to the blob store), list, get, preview, delete.

Validation runs off the request path: the row is created `validating` once the blob is complete
and one `tuneyard.validate_dataset` message goes to the `cpu` queue.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any, get_args

from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.broker import send_task
from app.db.models import Dataset, Run, Team
from app.errors import ApiError, Conflict, NotFound, Unprocessable
from app.ids import is_id, new_id
from app.jobs.states import RUN_STATES
from app.schemas.common import ListPage
from app.schemas.datasets import DatasetOut
from app.services.owned import get_owned
from app.services.pagination import paginate
from app.services.uploads import store_upload
from app.storage import BlobStore
from trainer_core.config import METHOD_FORMATS, DatasetFormat, RunSpec

log = logging.getLogger("tuneyard.datasets")

FORMATS: tuple[str, ...] = get_args(DatasetFormat)
PREVIEW_MAX_LINE_BYTES = 8 * 1024 * 1024


def parse_format(value: str | None, param: str = "format") -> str | None:
    """Returns a known dataset format, or None for auto-detection; 422 naming `param` otherwise."""
    if value is None or value.strip() in ("", "auto"):
        return None
    if value not in FORMATS:
        raise Unprocessable(f"unknown dataset format {value!r}: use one of {', '.join(FORMATS)} or omit it "
                            "to auto-detect", param=param)
    return value


def printable(text: str) -> str:
    """Returns the text without control characters (names end up in logs and database columns)."""
    return "".join(ch for ch in text if ch.isprintable()).strip() or "upload.jsonl"


def blob_key(team_id: str, dataset_id: str) -> str:
    return f"datasets/{team_id}/{dataset_id}.jsonl"


async def upload_dataset(session: Session, store: BlobStore, celery: Celery, team: Team, *,
                         chunks: AsyncIterator[bytes], content_type: str, max_bytes: int,
                         format: str | None, name: str | None, purpose: str | None = None) -> Dataset:
    """Returns the new `validating` dataset after streaming the body to storage and queueing validation.

    Multipart fields `format`/`name` override the query parameters. With `purpose` given (the
    OpenAI files face) the multipart `purpose` field must equal it; otherwise it is ignored.
    """
    fmt = parse_format(format)
    dataset_id = new_id("ds")
    key = blob_key(team.id, dataset_id)
    upload = await store_upload(chunks, content_type, store, key, max_bytes)
    try:
        if purpose is not None and upload.fields.get("purpose") != purpose:
            raise ApiError(f"purpose must be {purpose!r} (got {upload.fields.get('purpose')!r}): this server "
                           "stores fine-tuning files only", code="invalid_purpose", param="purpose")
        if "format" in upload.fields:
            fmt = parse_format(upload.fields["format"])
        display_name = printable(upload.fields.get("name") or name or upload.filename or "")[:300]
        dataset = Dataset(id=dataset_id, team_id=team.id, name=display_name, format=fmt, status="validating",
                          size_bytes=upload.size, sha256=upload.sha256, blob_key=key, stats={}, errors=[])
        session.add(dataset)
        await run_in_threadpool(session.commit)
    except BaseException:
        store.delete(key)
        raise
    await run_in_threadpool(send_task, celery, "tuneyard.validate_dataset", [dataset.id])
    return dataset


def check_usable(dataset: Dataset | None, dataset_id: str, param: str, *, method: str | None = None,
                 missing: type[ApiError] = Unprocessable) -> Dataset:
    """Returns the dataset when a job can use it: ready, and in a format `method` trains on.

    Missing (or another team's): `missing` (422 where a run spec names it, 404 for an eval's
    `dataset_id`); still validating: 409 (retry once validation finished); invalid or the wrong
    format: 422. Every error names `param`.
    """
    if dataset is None:
        raise missing(f"{param}: no dataset {dataset_id!r}", code="dataset_not_found", param=param)
    if dataset.status == "validating":
        raise Conflict(f"{param}: dataset {dataset_id} is still validating; retry when it is ready",
                       code="dataset_not_ready", param=param)
    if dataset.status != "ready" or dataset.format is None:
        raise Unprocessable(f"{param}: dataset {dataset_id} is {dataset.status}; fix the file and upload it "
                            "again", code="dataset_invalid", param=param)
    accepted = METHOD_FORMATS[method] if method else (dataset.format,)
    if dataset.format not in accepted:
        raise Unprocessable(f"{param}: dataset {dataset_id} has format {dataset.format!r}, method {method!r} "
                            f"trains on {' or '.join(accepted)}", code="dataset_format_mismatch", param=param)
    return dataset


def usable_dataset(session: Session, team: Team, dataset_id: str, *, param: str) -> Dataset:
    """Returns the team's usable dataset (`check_usable`; a missing one answers 404)."""
    dataset = session.get(Dataset, dataset_id) if is_id(dataset_id, "ds") else None
    owned = dataset if dataset is not None and dataset.team_id == team.id else None
    return check_usable(owned, dataset_id, param, missing=NotFound)


def list_datasets(session: Session, team: Team, *, limit: int, after: str | None) -> ListPage[DatasetOut]:
    stmt = select(Dataset).where(Dataset.team_id == team.id)
    rows, has_more, cursor = paginate(session, stmt, Dataset.id, limit=limit, after=after)
    return ListPage[DatasetOut](data=[DatasetOut.model_validate(r) for r in rows], has_more=has_more,
                                next_cursor=cursor)


def preview_dataset(store: BlobStore, dataset: Dataset, limit: int) -> list[Any]:
    """Returns the first `limit` lines that parse as JSON objects (malformed lines are skipped)."""
    records: list[Any] = []
    scanned = 0
    with store.open(dataset.blob_key) as stream:
        while len(records) < limit and scanned < limit * 10 + 1000:
            line = stream.readline(PREVIEW_MAX_LINE_BYTES + 1)
            if not line:
                break
            scanned += 1
            if len(line) > PREVIEW_MAX_LINE_BYTES and not line.endswith(b"\n"):
                while (rest := stream.readline(PREVIEW_MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                    pass
                continue
            if scanned == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def runs_using(session: Session, team: Team, dataset_id: str) -> list[str]:
    """Returns the ids of the team's queued/running/cancelling runs that read the dataset."""
    runs = session.scalars(select(Run).where(Run.team_id == team.id, Run.status.in_(RUN_STATES.active))).all()
    using = []
    for run in runs:
        try:
            ids = RunSpec.model_validate(run.spec).dataset_ids()
        except ValueError:
            continue
        if dataset_id in ids:
            using.append(run.id)
    return using


def delete_dataset(session: Session, store: BlobStore, team: Team, dataset_id: str) -> None:
    """Deletes the dataset and its blob; 409 while an active run uses it."""
    dataset = get_owned(session, Dataset, team, dataset_id)
    using = runs_using(session, team, dataset_id)
    if using:
        raise Conflict(f"dataset {dataset_id} is used by active run(s) {', '.join(using)}; cancel them or "
                       "wait until they finish", code="dataset_in_use", param="dataset_id")
    key = dataset.blob_key
    session.delete(dataset)
    session.commit()
    store.delete(key)
