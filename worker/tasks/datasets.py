"""Dataset validation off the request path: `tuneyard.validate_dataset(dataset_id)` on the `cpu` queue."""

from __future__ import annotations

import logging
from functools import cache

from celery import Celery, shared_task
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app.broker import create_celery
from app.db.models import Dataset, utcnow
from app.db.session import make_session_factory
from app.services.fine_tuning import start_waiting_jobs
from app.settings import get_settings
from app.storage import BlobStore, LocalBlobStore
from trainer_core.data.validate import validate_jsonl

log = logging.getLogger("tuneyard.worker.datasets")

MAX_REPORTED_ERRORS = 20


@cache
def _sessions() -> sessionmaker[Session]:
    return make_session_factory(get_settings())


@cache
def _store() -> LocalBlobStore:
    return LocalBlobStore(get_settings().storage_dir)


def validate_dataset_blob(sessions: sessionmaker[Session], store: BlobStore, dataset_id: str) -> str | None:
    """Returns the dataset's new status (ready|invalid) after validating its blob, None if skipped.

    A dataset that is gone or no longer `validating` is skipped, and the result is written only
    while the dataset is still `validating`, so a re-delivered or re-sent message (even one running
    beside the first copy) is harmless: validation of the same blob gives the same result.
    """
    with sessions() as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None or dataset.status != "validating":
            state = dataset.status if dataset else "deleted"
            log.info("dataset %s: nothing to validate (%s)", dataset_id, state)
            return None
        blob_key, fmt = dataset.blob_key, dataset.format
    # No transaction stays open while a large file is read.
    with store.open(blob_key) as stream:
        report = validate_jsonl(stream, fmt, max_errors=MAX_REPORTED_ERRORS)
    result = report.to_dict()
    status = "ready" if report.ok else "invalid"
    with sessions() as session:
        written = session.execute(
            update(Dataset).where(Dataset.id == dataset_id, Dataset.status == "validating")
            .values(format=report.format, num_records=report.num_records, errors=result["errors"],
                    stats={**result["stats"], "num_errors": report.num_errors,
                           "num_warnings": report.num_warnings, "warnings": result["warnings"]},
                    status=status,
                    validated_at=utcnow())
            .execution_options(synchronize_session=False)).rowcount
        session.commit()
    if not written:
        log.info("dataset %s: validated elsewhere or deleted meanwhile; result dropped", dataset_id)
        return None
    log.info("dataset %s: %s, %d records, %d errors, %d warnings", dataset_id, status, report.num_records,
             report.num_errors, report.num_warnings)
    return status


@cache
def _celery() -> Celery:
    return create_celery(get_settings())


def start_jobs_of(sessions: sessionmaker[Session], dataset_id: str) -> None:
    """Starts (or fails) the fine-tuning jobs that waited for this file's validation."""
    with sessions() as session:
        start_waiting_jobs(session, get_settings(), _celery(), dataset_id)


@shared_task(name="tuneyard.validate_dataset", acks_late=True, ignore_result=True)
def validate_dataset(dataset_id: str) -> None:
    if validate_dataset_blob(_sessions(), _store(), dataset_id) is not None:
        start_jobs_of(_sessions(), dataset_id)
