"""Run execution in the database: the atomic claim, the fenced writes of one attempt, the end states.

A worker owns a run only through the attempt number its claim returned. Every write it makes
afterwards first runs `fence()` — `UPDATE runs … WHERE id = :run AND attempt = :attempt AND status
IN (running, cancelling)` — in the same transaction, and a zero row count raises `StaleAttempt`:
the reaper or a newer claim took the run, so nothing of this attempt may land.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from sqlalchemy import bindparam, func, or_, select, update
from sqlalchemy.orm import Session

from app.broker import send_task
from app.db.models import Event, Run, RunStage, Team, UTCDateTime, utcnow
from app.errors import Conflict
from app.services import outbox
from app.services.run_states import IllegalTransition, transition_atomically, transition_values
from app.settings import Settings

LIVE = ("running", "cancelling")


class StaleAttempt(Exception):
    """This attempt no longer owns the run (re-queued, re-claimed or finished elsewhere)."""

    def __init__(self, run_id: str, attempt: int) -> None:
        super().__init__(f"run {run_id}: attempt {attempt} no longer holds the lease; its writes are refused")
        self.run_id = run_id
        self.attempt = attempt


@dataclass(frozen=True)
class Claim:
    """What a worker got by claiming a run: the fencing token and why this attempt started."""

    run_id: str
    attempt: int
    resume_reason: str | None  # None on a first start; else why an earlier attempt ended


def claim_run(session: Session, run_id: str, owner: str, now: datetime, lease_seconds: float) -> Claim | None:
    """Returns the claim of a queued run (or a running one whose lease expired), None if someone holds it.

    One UPDATE … RETURNING moves the run to `running`, increments the attempt and sets the lease,
    so of two workers handed the same message exactly one gets a row back.
    """
    stale_before = now - timedelta(seconds=lease_seconds)
    claimable = or_(
        Run.status == "queued",
        (Run.status == "running") & or_(Run.heartbeat_at.is_(None), Run.heartbeat_at < stale_before),
    )
    attempt = session.execute(
        update(Run).where(Run.id == run_id, claimable, Run.attempt < Run.max_attempts)
        .values(status="running", attempt=Run.attempt + 1, lease_owner=owner, heartbeat_at=now,
                started_at=func.coalesce(Run.started_at, bindparam("claimed_at", now, type_=UTCDateTime())))
        .returning(Run.attempt)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if attempt is None:
        session.rollback()
        return None
    reason = _resume_reason(session, run_id) if attempt > 1 else None
    session.add(Event(run_id=run_id, attempt=attempt, kind="claimed",
                      message=f"attempt {attempt} started on {owner}", data={"owner": owner}))
    session.commit()
    return Claim(run_id, attempt, reason)


def _resume_reason(session: Session, run_id: str) -> str:
    kind = session.scalar(select(Event.kind).where(
        Event.run_id == run_id, Event.kind.in_(("requeued", "resume_requested", "retrying")))
        .order_by(Event.id.desc()).limit(1))
    return {"requeued": "after a lost worker", "resume_requested": "after a resume request",
            "retrying": "after a system error"}.get(kind or "", "after an interrupted attempt")


def fence(session: Session, run_id: str, attempt: int, now: datetime | None = None) -> str:
    """Returns the run's status after refreshing this attempt's heartbeat; raises StaleAttempt.

    Call it first in every transaction of a worker: the row lock it takes on PostgreSQL keeps the
    reaper from re-queuing the run until the transaction commits.
    """
    status = session.execute(
        update(Run).where(Run.id == run_id, Run.attempt == attempt, Run.status.in_(LIVE))
        .values(heartbeat_at=now or utcnow()).returning(Run.status)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if status is None:
        session.rollback()
        raise StaleAttempt(run_id, attempt)
    return status


def add_event(session: Session, run_id: str, attempt: int, kind: str, message: str,
              data: dict[str, Any] | None = None, level: str = "info") -> None:
    session.add(Event(run_id=run_id, attempt=attempt, kind=kind, message=message, data=data, level=level))


def set_stages(session: Session, run_id: str, where_status: tuple[str, ...], new_status: str,
               now: datetime | None = None) -> None:
    """Moves every stage of the run in one of `where_status` to `new_status` (finished_at on ends)."""
    values: dict[str, Any] = {"status": new_status}
    if new_status in ("succeeded", "failed", "cancelled"):
        values["finished_at"] = now or utcnow()
    session.execute(update(RunStage).where(RunStage.run_id == run_id, RunStage.status.in_(where_status))
                    .values(**values).execution_options(synchronize_session=False))


def finish_attempt(session: Session, run_id: str, attempt: int, new_status: str,
                   error: dict[str, Any] | None = None) -> str:
    """Returns the status the run ended in after this attempt moved it to `new_status`; raises StaleAttempt.

    A `running` run asked to end `cancelled` ends `cancelled` only if a cancel was requested; a
    `cancelling` run that finished all its work anyway ends `succeeded`.
    """
    now = utcnow()
    current = fence(session, run_id, attempt, now)
    values = transition_values(run_id, current, new_status, now)
    if error is not None:
        values["error"] = error
    session.execute(update(Run).where(Run.id == run_id, Run.attempt == attempt, Run.status == current)
                    .values(**values).execution_options(synchronize_session=False))
    stage_end = {"succeeded": "succeeded", "failed": "failed", "cancelled": "cancelled"}.get(new_status)
    if stage_end is not None:
        set_stages(session, run_id, ("running",), stage_end, now)
        if new_status != "succeeded":
            pending_to = "cancelled" if new_status == "cancelled" else "pending"
            set_stages(session, run_id, ("pending",), pending_to, now)
    outbox.run_ended(session, run_id, new_status)
    return new_status


def requeue_attempt(session: Session, run_id: str, attempt: int, *, kind: str, message: str,
                    data: dict[str, Any] | None = None) -> bool:
    """Returns True if the run went back to `queued` for another attempt, False if attempts are spent."""
    now = utcnow()
    current = fence(session, run_id, attempt, now)
    run = session.get(Run, run_id)
    assert run is not None
    if attempt >= run.max_attempts:
        return False
    target = "queued" if current == "running" else "cancelled"
    session.execute(update(Run).where(Run.id == run_id, Run.attempt == attempt)
                    .values(**transition_values(run_id, current, target, now))
                    .execution_options(synchronize_session=False))
    set_stages(session, run_id, ("running",), "pending" if target == "queued" else "cancelled", now)
    add_event(session, run_id, attempt, kind, message, data, level="warning")
    outbox.run_ended(session, run_id, target)
    return target == "queued"


def resume_run(session: Session, settings: Settings, celery: Celery, team: Team, run_id: str) -> Run:
    """Returns a failed or cancelled run moved back to `queued` (it continues from its last checkpoint).

    The attempt cap restarts: the run may use `settings.max_attempts` more attempts from here.
    """
    from app.services.runs import get_run

    run = get_run(session, team, run_id)
    try:
        moved = transition_atomically(session, run, "queued", error=None,
                                      max_attempts=run.attempt + settings.max_attempts)
    except IllegalTransition as exc:
        raise Conflict(f"run {run.id} is {run.status}; only failed or cancelled runs can be resumed",
                       code="run_not_resumable") from exc
    if not moved:
        raise Conflict(f"run {run.id} changed state while resuming; retry", code="run_state_changed")
    set_stages(session, run.id, ("running", "failed", "cancelled"), "pending")
    add_event(session, run.id, run.attempt, "resume_requested",
              "resume requested; the run continues from its last complete checkpoint")
    session.commit()
    session.refresh(run)
    send_task(celery, "tuneyard.train_run", [run.id])
    return run
