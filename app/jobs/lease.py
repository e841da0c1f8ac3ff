"""The lease of one attempt at a job: the atomic claim, the fence of every write, the end, the heartbeat.

A worker owns a job only through the attempt number its claim returned. Every write it makes
afterwards first runs `fence()` — `UPDATE <jobs> … WHERE id = :id AND attempt = :attempt AND status
IN (the live statuses)` — in the same transaction, and a zero row count raises `StaleAttempt`:
the reaper or a newer claim took the job, so nothing of this attempt may land.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Event, Run, UTCDateTime, utcnow
from app.jobs.states import RUN, JobKind, after_move
from app.settings import Settings

log = logging.getLogger("tuneyard.jobs.lease")


class StaleAttempt(Exception):
    """This attempt no longer owns the job (re-queued, re-claimed or finished elsewhere)."""

    def __init__(self, kind: str, job_id: str, attempt: int) -> None:
        super().__init__(f"{kind} {job_id}: attempt {attempt} no longer holds the lease; "
                         "its writes are refused")
        self.kind = kind
        self.job_id = job_id
        self.attempt = attempt


@dataclass(frozen=True)
class Claim:
    """What a worker got by claiming a job: the fencing token and why this attempt started."""

    kind: JobKind
    job_id: str
    attempt: int
    resume_reason: str | None  # None on a first start; else why an earlier attempt ended


def claim(session: Session, kind: JobKind, job_id: str, owner: str, now: datetime, *, lease_seconds: float,
          max_attempts: int) -> Claim | None:
    """Returns the claim of a queued job (or a running one whose lease expired), None if someone holds it.

    One UPDATE … RETURNING moves the job to `running`, increments the attempt and sets the lease,
    so of two workers handed the same message exactly one gets a row back. `max_attempts` caps
    kinds whose rows carry no cap of their own (evals). Commits.
    """
    model = kind.model
    stale_before = now - timedelta(seconds=lease_seconds)
    claimable = or_(
        model.status == "queued",
        (model.status == "running") & or_(model.heartbeat_at.is_(None), model.heartbeat_at < stale_before),
    )
    values: dict[str, Any] = {"status": "running", "attempt": model.attempt + 1, "lease_owner": owner,
                              "heartbeat_at": now, **kind.claim_values}
    if kind is RUN:
        claimed_at = bindparam("claimed_at", now, type_=UTCDateTime())
        values["started_at"] = func.coalesce(Run.started_at, claimed_at)
    attempt = session.execute(
        update(model).where(model.id == job_id, claimable, model.attempt < kind.cap(max_attempts))
        .values(**values).returning(model.attempt)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if attempt is None:
        session.rollback()
        return None
    reason = None
    if kind.has_stages:
        reason = _resume_reason(session, job_id) if attempt > 1 else None
        add_event(session, job_id, attempt, "claimed", f"attempt {attempt} started on {owner}",
                  {"owner": owner})
    session.commit()
    return Claim(kind, job_id, attempt, reason)


def take(sessions: sessionmaker[Session], kind: JobKind, job_id: str,
         settings: Settings) -> tuple[Claim, Lease] | None:
    """Returns this process's claim of the job and its started lease; None (logged) when the job is
    held, finished or out of attempts — a message delivered twice, or re-sent, ends there."""
    owner = f"{socket.gethostname()}:{os.getpid()}"
    with sessions() as session:
        claimed = claim(session, kind, job_id, owner, utcnow(), lease_seconds=settings.lease_seconds,
                        max_attempts=settings.max_attempts)
        if claimed is None:
            row = session.get(kind.model, job_id)
            log.info("%s %s: not claimed (%s); this delivery exits", kind.name, job_id,
                     f"{row.status}, attempt {row.attempt}" if row else f"no such {kind.name}")
            return None
    log.info("%s %s: attempt %d claimed by %s", kind.name, job_id, claimed.attempt, owner)
    lease = Lease(sessions, kind, job_id, claimed.attempt, heartbeat_seconds=settings.heartbeat_seconds)
    return claimed, lease.start()


def _resume_reason(session: Session, run_id: str) -> str:
    kind = session.scalar(select(Event.kind).where(
        Event.run_id == run_id, Event.kind.in_(("requeued", "resume_requested", "retrying")))
        .order_by(Event.id.desc()).limit(1))
    return {"requeued": "after a lost worker", "resume_requested": "after a resume request",
            "retrying": "after a system error"}.get(kind or "", "after an interrupted attempt")


def fence(session: Session, kind: JobKind, job_id: str, attempt: int, now: datetime | None = None,
          **values: Any) -> str:
    """Returns the job's status after refreshing this attempt's heartbeat (and writing `values`);
    raises StaleAttempt.

    Call it first in every transaction of a worker: the row lock it takes on PostgreSQL keeps the
    reaper from re-queuing the job until the transaction commits.
    """
    model = kind.model
    status = session.execute(
        update(model).where(model.id == job_id, model.attempt == attempt, model.status.in_(kind.live))
        .values(heartbeat_at=now or utcnow(), **values).returning(model.status)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if status is None:
        session.rollback()
        raise StaleAttempt(kind.name, job_id, attempt)
    return status


def add_event(session: Session, run_id: str, attempt: int, kind: str, message: str,
              data: dict[str, Any] | None = None, level: str = "info") -> None:
    """Adds one event to a run's history (the caller commits)."""
    session.add(Event(run_id=run_id, attempt=attempt, kind=kind, message=message, data=data, level=level))


def end_attempt(session: Session, kind: JobKind, job_id: str, attempt: int, new_status: str,
                error: dict[str, Any] | None = None) -> str:
    """Returns `new_status` after this attempt moved the job there (a run's stages along); raises
    StaleAttempt, or IllegalTransition (a `running` run cannot end `cancelled` without a cancel
    request). The caller commits.
    """
    now = utcnow()
    current = fence(session, kind, job_id, attempt, now)
    values = kind.states.values(job_id, current, new_status, now)
    if error is not None:
        values["error"] = error
    model = kind.model
    session.execute(update(model).where(model.id == job_id, model.attempt == attempt, model.status == current)
                    .values(**values).execution_options(synchronize_session=False))
    after_move(session, kind, job_id, new_status, now)
    return new_status


def requeue_attempt(session: Session, run_id: str, attempt: int, *, kind: str, message: str,
                    data: dict[str, Any] | None = None) -> bool:
    """Returns True if the run went back to `queued` for another attempt, False if attempts are spent.

    A `cancelling` run ends `cancelled` instead (nobody wants it retried). The caller commits.
    """
    now = utcnow()
    current = fence(session, RUN, run_id, attempt, now)
    max_attempts = session.scalar(select(Run.max_attempts).where(Run.id == run_id))
    if max_attempts is None or attempt >= max_attempts:
        return False
    target = "queued" if current == "running" else "cancelled"
    session.execute(update(Run).where(Run.id == run_id, Run.attempt == attempt)
                    .values(**RUN.states.values(run_id, current, target, now))
                    .execution_options(synchronize_session=False))
    after_move(session, RUN, run_id, target, now)
    add_event(session, run_id, attempt, kind, message, data, level="warning")
    return target == "queued"


class Lease:
    """Keeps one attempt's heartbeat on a thread; `lost` is set once the fence refuses it.

    For kinds that can be cancelled (runs) the thread also watches for a cancel request:
    `should_stop()` reads flags this thread sets, so the training thread never queries the
    database to decide whether to stop. The job is looked at every `poll_seconds` (at most 1 s,
    so a cancel is seen within about a second) and its heartbeat refreshed every
    `heartbeat_seconds`. Kinds without a cancel (evals) only beat; their next fenced write ends
    an attempt that lost its lease.
    """

    def __init__(self, sessions: sessionmaker[Session], kind: JobKind, job_id: str, attempt: int, *,
                 heartbeat_seconds: float, poll_seconds: float = 1.0) -> None:
        self._sessions = sessions
        self.kind = kind
        self.job_id = job_id
        self.attempt = attempt
        self.heartbeat_seconds = heartbeat_seconds
        self.watch_cancel = "cancelling" in kind.live
        self.poll_seconds = min(poll_seconds, heartbeat_seconds) if self.watch_cancel else heartbeat_seconds
        self.cancel_requested = threading.Event()
        self.lost = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{job_id}", daemon=True)

    def start(self) -> Lease:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def should_stop(self) -> bool:
        return self.cancel_requested.is_set() or self.lost.is_set()

    def _loop(self) -> None:
        last_beat = time.monotonic()
        while not self._done.wait(self.poll_seconds):
            try:
                if time.monotonic() - last_beat >= self.heartbeat_seconds:
                    status = self.beat()
                    last_beat = time.monotonic()
                else:
                    status = self._peek()
            except StaleAttempt:
                log.warning("%s %s: attempt %d lost its lease; stopping", self.kind.name, self.job_id,
                            self.attempt)
                self.lost.set()
                return
            except Exception:  # a database hiccup: keep working, the next beat retries
                log.exception("%s %s: heartbeat failed", self.kind.name, self.job_id)
                continue
            if status == "cancelling" and not self.cancel_requested.is_set():
                log.info("%s %s: cancel requested", self.kind.name, self.job_id)
                self.cancel_requested.set()

    def beat(self) -> str:
        """Returns the job's status after one fenced heartbeat; raises StaleAttempt."""
        with self._sessions() as session:
            status = fence(session, self.kind, self.job_id, self.attempt)
            session.commit()
            return status

    def _peek(self) -> str:
        model = self.kind.model
        with self._sessions() as session:
            row = session.execute(select(model.status, model.attempt)
                                  .where(model.id == self.job_id)).one_or_none()
        if row is None or row.attempt != self.attempt or row.status not in self.kind.live:
            raise StaleAttempt(self.kind.name, self.job_id, self.attempt)
        return row.status
