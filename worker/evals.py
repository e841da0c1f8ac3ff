"""An eval on a worker: claim it, keep its heartbeat, evaluate every model, end it.

A message for an eval someone else holds (a re-delivery, a reaper re-send) finds no claim and
returns at once; an attempt that lost its lease has its writes refused and stops.
"""

from __future__ import annotations

import logging
import os
import socket
from functools import cache

from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Eval, utcnow
from app.db.session import make_session_factory
from app.services.eval_execution import StaleEvalAttempt, claim_eval, execute_eval, save_eval
from app.settings import Settings, get_settings
from app.storage import LocalBlobStore
from worker.lease import Heartbeat

log = logging.getLogger("tuneyard.worker.evals")


@cache
def _services() -> tuple[Settings, sessionmaker[Session], LocalBlobStore]:
    settings = get_settings()
    return settings, make_session_factory(settings), LocalBlobStore(settings.storage_dir)


def run_eval(eval_id: str) -> str:
    """Returns how this delivery of the eval's message ended (the Celery task's whole body)."""
    settings, sessions, store = _services()
    return execute_claimed_eval(eval_id, settings=settings, sessions=sessions, store=store)


def execute_claimed_eval(eval_id: str, *, settings: Settings, sessions: sessionmaker[Session],
                         store: LocalBlobStore) -> str:
    """Returns succeeded|failed, or skipped (not claimable) or superseded (lost its lease)."""
    owner = f"{socket.gethostname()}:{os.getpid()}"
    with sessions() as session:
        attempt = claim_eval(session, eval_id, owner, utcnow(), lease_seconds=settings.lease_seconds,
                             max_attempts=settings.max_attempts)
        if attempt is None:
            row = session.get(Eval, eval_id)
            log.info("eval %s: not claimed (%s); this delivery exits", eval_id,
                     f"{row.status}, attempt {row.attempt}" if row else "no such eval")
            return "skipped"
    log.info("eval %s: attempt %d claimed by %s", eval_id, attempt, owner)

    def beat() -> None:
        with sessions() as beat_session:
            save_eval(beat_session, eval_id, attempt)

    heartbeat = Heartbeat(f"eval {eval_id}", beat, settings.heartbeat_seconds, StaleEvalAttempt).start()
    try:
        return execute_eval(sessions, settings, store, eval_id, attempt)
    except StaleEvalAttempt:
        log.warning("eval %s: attempt %d was superseded; its results are discarded", eval_id, attempt)
        return "superseded"
    finally:
        heartbeat.stop()
