"""Dataset validation off the request path: `tuneyard.validate_dataset(dataset_id)` on the `cpu` queue."""

from __future__ import annotations

import logging
from functools import cache

from celery import shared_task
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Dataset, utcnow
from app.db.session import make_session_factory
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

    A dataset that is gone or no longer `validating` is skipped, so a re-delivered message is harmless.
    """
    with sessions() as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None or dataset.status != "validating":
            state = dataset.status if dataset else "deleted"
            log.info("dataset %s: nothing to validate (%s)", dataset_id, state)
            return None
        with store.open(dataset.blob_key) as stream:
            report = validate_jsonl(stream, dataset.format, max_errors=MAX_REPORTED_ERRORS)
        result = report.to_dict()
        dataset.format = report.format
        dataset.num_records = report.num_records
        dataset.errors = result["errors"]
        dataset.stats = {**result["stats"], "num_errors": report.num_errors}
        dataset.status = "ready" if report.ok else "invalid"
        dataset.validated_at = utcnow()
        session.commit()
        log.info("dataset %s: %s, %d records, %d errors", dataset_id, dataset.status, report.num_records,
                 report.num_errors)
        return dataset.status


@shared_task(name="tuneyard.validate_dataset", acks_late=True, ignore_result=True)
def validate_dataset(dataset_id: str) -> None:
    validate_dataset_blob(_sessions(), _store(), dataset_id)
