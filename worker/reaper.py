"""The reaper: the database decides what needs work, the broker is only told again.

Each pass (`reap_once`):
- a `running` run whose heartbeat is older than `lease_seconds` lost its worker: back to `queued`
  (its next attempt resumes from the last complete checkpoint), or `failed` when its attempts
  are spent; a `cancelling` one ends `cancelled`;
- a `running` eval whose heartbeat is stale goes back to `queued` (it starts over), or `failed`
  when its attempts are spent;
- a `queued` run or eval, or a `validating` dataset, that nobody took within `queued_grace_seconds`
  gets its message sent again (the broker lost it: Redis restarted or was down at submit, the
  filesystem transport has no redelivery, a worker died holding it unacknowledged) — at most once
  per grace period (`resent_at`), so a worker that is merely busy gets one spare message per grace
  period, not one per pass; the first re-send of a queued period is logged (and a run's events say so).
Every change is one guarded UPDATE that re-checks the heartbeat, so a job whose worker beat in
the meantime is left alone. Messages are sent after the commit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session

from app.broker import create_celery, send_task
from app.db.models import Dataset, Eval, Event, Run, utcnow
from app.db.session import make_session_factory
from app.services import outbox
from app.services.execution import set_stages
from app.services.fine_tuning import start_waiting_jobs
from app.services.run_states import transition_values
from app.settings import Settings
from worker.webhooks import start_deliverer

log = logging.getLogger("tuneyard.reaper")


@dataclass
class ReapResult:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    unclaimed: list[str] = field(default_factory=list)  # queued runs past the grace period
    evals_requeued: list[str] = field(default_factory=list)
    evals_failed: list[str] = field(default_factory=list)
    evals_unclaimed: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)  # validating past the grace period

    @property
    def resend(self) -> list[str]:
        """Returns the runs whose message goes out (again) after this pass."""
        return self.requeued + [r for r in self.unclaimed if r not in self.requeued]


def reap_once(session: Session, now: datetime, *, lease_seconds: float, queued_grace_seconds: float,
              max_attempts: int = 3) -> ReapResult:
    """Returns what one pass changed (committed) and which jobs need their message sent again.

    `max_attempts` caps evals (runs carry their own cap in `runs.max_attempts`).
    """
    result = ReapResult()
    cutoff = now - timedelta(seconds=lease_seconds)
    _reap_runs(session, now, cutoff, result)
    _reap_evals(session, now, cutoff, max_attempts, result)
    grace_cutoff = now - timedelta(seconds=queued_grace_seconds)
    result.unclaimed = list(session.scalars(select(Run.id).where(
        Run.status == "queued", _due(Run.queued_at, Run.resent_at, grace_cutoff))))
    result.evals_unclaimed = [e for e in session.scalars(select(Eval.id).where(
        Eval.status == "queued", _due(Eval.queued_at, Eval.resent_at, grace_cutoff)))
        if e not in result.evals_requeued]
    result.datasets = list(session.scalars(select(Dataset.id).where(
        Dataset.status == "validating", _due(Dataset.created_at, Dataset.resent_at, grace_cutoff))))
    return result


def _due(waiting_since: InstrumentedAttribute, resent_at: InstrumentedAttribute,
         grace_cutoff: datetime) -> ColumnElement[bool]:
    return and_(or_(waiting_since.is_(None), waiting_since < grace_cutoff),
                or_(resent_at.is_(None), resent_at < grace_cutoff))


def _reap_runs(session: Session, now: datetime, cutoff: datetime, result: ReapResult) -> None:
    stale = or_(Run.heartbeat_at.is_(None), Run.heartbeat_at < cutoff)
    candidates = session.execute(
        select(Run.id, Run.status, Run.attempt, Run.max_attempts, Run.lease_owner, Run.heartbeat_at)
        .where(Run.status.in_(("running", "cancelling")), stale)).all()
    for run_id, status, attempt, max_attempts, owner, beat in candidates:
        silent = f"{(now - beat).total_seconds():.0f}s" if beat else "ever"
        if status == "cancelling":
            target, kind = "cancelled", "cancelled"
            message = f"worker {owner} was lost while cancelling (no heartbeat for {silent}); run cancelled"
        elif attempt < max_attempts:
            target, kind = "queued", "requeued"
            message = (f"worker {owner} lost (no heartbeat for {silent}); re-queued for attempt "
                       f"{attempt + 1} of {max_attempts}, resuming from the last checkpoint")
        else:
            target, kind = "failed", "error"
            message = (f"worker {owner} lost (no heartbeat for {silent}) on the last allowed attempt "
                       f"({attempt})")
        values = transition_values(run_id, status, target, now)
        if target == "failed":
            values["error"] = {"code": "attempts_exhausted", "message": message}
        moved = session.execute(
            update(Run).where(Run.id == run_id, Run.status == status, Run.attempt == attempt, stale)
            .values(**values).execution_options(synchronize_session=False)).rowcount
        if moved != 1:
            session.rollback()
            continue
        set_stages(session, run_id, ("running",), {"queued": "pending"}.get(target, target), now)
        if target != "queued":
            set_stages(session, run_id, ("pending",), target if target == "cancelled" else "pending", now)
        session.add(Event(run_id=run_id, attempt=attempt, kind=kind, message=message,
                          level="error" if target == "failed" else "warning",
                          data={"lost_owner": owner, "reason": "lease_expired"}))
        outbox.run_ended(session, run_id, target)
        session.commit()
        log.warning("run %s: %s", run_id, message)
        by_target = {"queued": result.requeued, "failed": result.failed, "cancelled": result.cancelled}
        by_target[target].append(run_id)


def _reap_evals(session: Session, now: datetime, cutoff: datetime, max_attempts: int,
                result: ReapResult) -> None:
    stale = or_(Eval.heartbeat_at.is_(None), Eval.heartbeat_at < cutoff)
    candidates = session.execute(select(Eval.id, Eval.attempt, Eval.lease_owner, Eval.heartbeat_at)
                                 .where(Eval.status == "running", stale)).all()
    for eval_id, attempt, owner, beat in candidates:
        silent = f"{(now - beat).total_seconds():.0f}s" if beat else "ever"
        values: dict[str, Any] = {"lease_owner": None, "heartbeat_at": None}
        if attempt < max_attempts:
            message = (f"worker {owner} lost (no heartbeat for {silent}); re-queued for attempt "
                       f"{attempt + 1} of {max_attempts}")
            values.update(status="queued", queued_at=now, resent_at=None, progress=0.0)
        else:
            message = (f"worker {owner} lost (no heartbeat for {silent}) on the last allowed attempt "
                       f"({attempt}); the eval failed")
            values.update(status="failed", finished_at=now,
                          error={"type": "attempts_exhausted", "message": message, "model": None})
        moved = session.execute(
            update(Eval).where(Eval.id == eval_id, Eval.status == "running", Eval.attempt == attempt, stale)
            .values(**values).execution_options(synchronize_session=False)).rowcount
        if moved != 1:
            session.rollback()
            continue
        outbox.eval_ended(session, eval_id, values["status"])
        session.commit()
        log.warning("eval %s: %s", eval_id, message)
        (result.evals_requeued if values["status"] == "queued" else result.evals_failed).append(eval_id)


@dataclass(frozen=True)
class _Message:
    task: str
    model: type[Run] | type[Eval] | type[Dataset]
    id: str
    waiting: str  # the status the job must still be in for the re-send to count
    unclaimed: bool  # a re-send after the grace period (False: the first message of a re-queue)


def resend(session: Session, celery: Celery, result: ReapResult, now: datetime,
           grace_seconds: float) -> int:
    """Sends the messages `result` calls for; returns how many went out (stops when the broker is down)."""
    unclaimed_runs = set(result.unclaimed) - set(result.requeued)
    messages = (
        [_Message("tuneyard.train_run", Run, r, "queued", r in unclaimed_runs) for r in result.resend]
        + [_Message("tuneyard.run_eval", Eval, e, "queued", False) for e in result.evals_requeued]
        + [_Message("tuneyard.run_eval", Eval, e, "queued", True) for e in result.evals_unclaimed]
        + [_Message("tuneyard.validate_dataset", Dataset, d, "validating", True) for d in result.datasets]
    )
    sent = 0
    for message in messages:
        if not send_task(celery, message.task, [message.id]):
            break  # the broker is down: the next pass tries again
        sent += 1
        if message.unclaimed:
            _record_resend(session, message, now, grace_seconds)
    return sent


def _record_resend(session: Session, message: _Message, now: datetime, grace_seconds: float) -> None:
    model = message.model
    first = session.scalar(select(model.resent_at).where(model.id == message.id)) is None
    moved = session.execute(update(model).where(model.id == message.id, model.status == message.waiting)
                            .values(resent_at=now).execution_options(synchronize_session=False)).rowcount
    what = {Run: "run", Eval: "eval", Dataset: "dataset"}[model]
    text = (f"no worker took the {what} within {grace_seconds:.0f}s; its message was sent again "
            f"(and is re-sent at most every {grace_seconds:.0f}s until a worker takes it)")
    if moved and first:
        log.info("%s %s: %s", what, message.id, text)
        if model is Run:
            attempt = session.scalar(select(Run.attempt).where(Run.id == message.id)) or 0
            session.add(Event(run_id=message.id, attempt=attempt, kind="resent", message=text,
                              level="warning", data={"reason": "unclaimed", "grace_seconds": grace_seconds}))
    else:
        log.debug("%s %s: message sent again", what, message.id)
    session.commit()


def run_reaper_forever(settings: Settings) -> None:
    """Runs a reaper pass every `reaper_interval_seconds` until the process is stopped."""
    sessions = make_session_factory(settings)
    celery = create_celery(settings)
    log.info("reaper started: lease %.1fs, queued grace %.1fs, every %.1fs", settings.lease_seconds,
             settings.queued_grace_seconds, settings.reaper_interval_seconds)
    start_deliverer(settings)
    while True:
        started = time.monotonic()
        try:
            with sessions() as session:
                now = utcnow()
                result = reap_once(session, now, lease_seconds=settings.lease_seconds,
                                   queued_grace_seconds=settings.queued_grace_seconds,
                                   max_attempts=settings.max_attempts)
                resend(session, celery, result, now, settings.queued_grace_seconds)
                # Jobs whose files finished validating while the validation task could not start them.
                start_waiting_jobs(session, settings, celery)
        except Exception:  # the database or broker is away: the next pass tries again
            log.exception("reaper pass failed")
        time.sleep(max(0.0, settings.reaper_interval_seconds - (time.monotonic() - started)))
