"""Eval jobs off the request path: `tuneyard.run_eval(eval_id)` on the `eval` queue."""

from __future__ import annotations

from functools import cache

from celery import shared_task
from sqlalchemy.orm import Session, sessionmaker

from app.db.session import make_session_factory
from app.services.evals import execute_eval
from app.settings import get_settings
from app.storage import LocalBlobStore


@cache
def _sessions() -> sessionmaker[Session]:
    return make_session_factory(get_settings())


@shared_task(name="tuneyard.run_eval", acks_late=True, ignore_result=True)
def run_eval(eval_id: str) -> None:
    settings = get_settings()
    execute_eval(_sessions(), settings, LocalBlobStore(settings.storage_dir), eval_id)
