"""The reaper: the database decides what needs work, the broker is only told again.

Each pass (`reap_once`), for every job kind (runs and evals):
- a live job whose heartbeat is older than `lease_seconds` lost its worker: back to `queued`
  (a run's next attempt resumes from the last complete checkpoint; an eval starts over), or
  `failed` when its attempts are spent; a `cancelling` run ends `cancelled`;
- a `queued` job, or a `validating` dataset, that nobody took within `queued_grace_seconds`
  gets its message sent again if the broker lost it (Redis restarted or was down at submit, the
  filesystem transport has no redelivery, a worker died holding it unacknowledged) — at most once
  per grace period (`resent_at`); the first re-send of a queued period is logged (and a run's
  events say so).
Only lost messages are re-sent: per queue, the broker's ready messages are compared with the items
waiting for it, and only the shortfall goes out (re-queued jobs first, then the longest waiting).
With workers down every waiting item still has its message in the queue, so nothing is sent and
the queue never grows past one message per item (plus the few a worker holds unacknowledged);
before, 1,000 waiting uploads grew the queue by 1,000 messages per grace period.
Every change is one guarded UPDATE that re-checks the heartbeat, so a job whose worker beat in
the meantime is left alone. Messages are sent after the commit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from celery import Celery
from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session

from app.broker import TASK_ROUTES, create_celery, queue_depth, send_task
from app.db.models import Dataset, Event, utcnow
from app.db.session import make_session_factory
from app.jobs.states import EVAL, RUN, JobKind, after_move
from app.services.fine_tuning import start_waiting_jobs
from app.settings import Settings

log = logging.getLogger("tuneyard.reaper")

KINDS = (RUN, EVAL)
# Longer than any submit takes between committing its row and publishing its message.
PUBLISH_MARGIN_SECONDS = 5.0


@dataclass
class Reaped:
    """What one pass did to the jobs of one kind."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    unclaimed: list[str] = field(default_factory=list)  # queued past the grace period (not re-queued now)


@dataclass
class ReapResult:
    jobs: dict[str, Reaped] = field(default_factory=lambda: {kind.name: Reaped() for kind in KINDS})
    datasets: list[str] = field(default_factory=list)  # validating past the grace period

    @property
    def runs(self) -> Reaped:
        return self.jobs[RUN.name]

    @property
    def evals(self) -> Reaped:
        return self.jobs[EVAL.name]


def reap_once(session: Session, now: datetime, *, lease_seconds: float, queued_grace_seconds: float,
              max_attempts: int = 3) -> ReapResult:
    """Returns what one pass changed (committed) and which jobs need their message sent again.

    `max_attempts` caps evals (runs carry their own cap in `runs.max_attempts`).
    """
    result = ReapResult()
    cutoff = now - timedelta(seconds=lease_seconds)
    grace_cutoff = now - timedelta(seconds=queued_grace_seconds)
    for kind in KINDS:
        reaped = result.jobs[kind.name]
        _reap_stale(session, kind, now, cutoff, max_attempts, reaped)
        model = kind.model
        reaped.unclaimed = [j for j in session.scalars(select(model.id).where(
            model.status == "queued", _due(model.queued_at, model.resent_at, grace_cutoff))
            .order_by(func.coalesce(model.resent_at, model.queued_at)))
            if j not in reaped.requeued]
    result.datasets = list(session.scalars(select(Dataset.id).where(
        Dataset.status == "validating", _due(Dataset.created_at, Dataset.resent_at, grace_cutoff))
        .order_by(func.coalesce(Dataset.resent_at, Dataset.created_at))))
    return result


def _due(waiting_since: InstrumentedAttribute, resent_at: InstrumentedAttribute,
         grace_cutoff: datetime) -> ColumnElement[bool]:
    return and_(or_(waiting_since.is_(None), waiting_since < grace_cutoff),
                or_(resent_at.is_(None), resent_at < grace_cutoff))


def _reap_stale(session: Session, kind: JobKind, now: datetime, cutoff: datetime, max_attempts: int,
                reaped: Reaped) -> None:
    model = kind.model
    stale = or_(model.heartbeat_at.is_(None), model.heartbeat_at < cutoff)
    candidates = session.execute(
        select(model.id, model.status, model.attempt, kind.cap(max_attempts), model.lease_owner,
               model.heartbeat_at)
        .where(model.status.in_(kind.live), stale)).all()
    for job_id, status, attempt, cap, owner, beat in candidates:
        silent = f"{(now - beat).total_seconds():.0f}s" if beat else "ever"
        lost = f"worker {owner} lost (no heartbeat for {silent})"
        if status == "cancelling":
            target, event = "cancelled", "cancelled"
            message = f"worker {owner} was lost while cancelling (no heartbeat for {silent}); run cancelled"
        elif attempt < cap:
            target, event = "queued", "requeued"
            message = f"{lost}; re-queued for attempt {attempt + 1} of {cap}" + (
                ", resuming from the last checkpoint" if kind.has_stages else "")
        else:
            target, event = "failed", "error"
            message = f"{lost} on the last allowed attempt ({attempt}); the {kind.name} failed"
        values = kind.states.values(job_id, status, target, now)
        if target == "failed":
            values["error"] = kind.error("attempts_exhausted", message)
        moved = session.execute(
            update(model).where(model.id == job_id, model.status == status, model.attempt == attempt, stale)
            .values(**values).execution_options(synchronize_session=False)).rowcount
        if moved != 1:
            session.rollback()
            continue
        after_move(session, kind, job_id, target, now)
        if kind.has_stages:
            session.add(Event(run_id=job_id, attempt=attempt, kind=event, message=message,
                              level="error" if target == "failed" else "warning",
                              data={"lost_owner": owner, "reason": "lease_expired"}))
        session.commit()
        log.warning("%s %s: %s", kind.name, job_id, message)
        by_target = {"queued": reaped.requeued, "failed": reaped.failed, "cancelled": reaped.cancelled}
        by_target[target].append(job_id)


@dataclass(frozen=True)
class _Message:
    task: str
    model: type
    what: str  # run, eval or dataset
    id: str
    waiting: str  # the status the job must still be in for the re-send to count
    unclaimed: bool  # a re-send after the grace period (False: the first message of a re-queue)


def resend(session: Session, celery: Celery, result: ReapResult, now: datetime,
           grace_seconds: float) -> int:
    """Sends the messages `result` calls for that the broker lost; returns how many went out.

    Stops when the broker is down. Where the broker cannot tell a queue's depth, everything due
    is sent (duplicates are harmless: a second copy finds the job claimed).
    """
    groups: list[list[_Message]] = []
    for kind in KINDS:
        reaped = result.jobs[kind.name]
        due = [(j, False) for j in reaped.requeued] + [(j, True) for j in reaped.unclaimed]
        groups.append([_Message(kind.task, kind.model, kind.name, j, "queued", again) for j, again in due])
    groups.append([_Message("tuneyard.validate_dataset", Dataset, "dataset", d, "validating", True)
                   for d in result.datasets])
    messages = [m for group in groups if group for m in _lost_only(session, celery, group, now)]
    sent = 0
    for message in messages:
        if not send_task(celery, message.task, [message.id]):
            break  # the broker is down: the next pass tries again
        sent += 1
        if message.unclaimed:
            _record_resend(session, message, now, grace_seconds)
    return sent


def _lost_only(session: Session, celery: Celery, group: list[_Message], now: datetime) -> list[_Message]:
    """Returns the first messages of `group` (one job kind, one queue) up to the number the broker lost.

    Only items that have waited PUBLISH_MARGIN_SECONDS are counted: a submit commits its row before
    it publishes, so a newer item's message may still be on its way (counting it would re-send an
    older item's message that is not lost).
    """
    first = group[0]
    depth = queue_depth(celery, TASK_ROUTES[first.task]["queue"])
    if depth is None:
        return group
    model = first.model
    since = model.created_at if model is Dataset else model.queued_at
    settled = now - timedelta(seconds=PUBLISH_MARGIN_SECONDS)
    waiting = session.scalar(select(func.count()).select_from(model).where(
        model.status == first.waiting, or_(since.is_(None), since < settled)))
    # Jobs this pass re-queued lost their message with their worker; the rest are counted.
    requeued = sum(1 for m in group if not m.unclaimed)
    lost = requeued + max(0, (waiting or 0) - depth)
    if lost < len(group):
        log.info("%d %s(s) due for a re-send, %d waiting, %d messages queued: re-sending %d", len(group),
                 first.what, waiting, depth, lost)
    return group[:lost]


def _record_resend(session: Session, message: _Message, now: datetime, grace_seconds: float) -> None:
    model = message.model
    first = session.scalar(select(model.resent_at).where(model.id == message.id)) is None
    moved = session.execute(update(model).where(model.id == message.id, model.status == message.waiting)
                            .values(resent_at=now).execution_options(synchronize_session=False)).rowcount
    text = (f"no worker took the {message.what} within {grace_seconds:.0f}s; its message was sent again "
            f"(and is re-sent at most every {grace_seconds:.0f}s until a worker takes it)")
    if moved and first:
        log.info("%s %s: %s", message.what, message.id, text)
        if message.what == RUN.name:
            attempt = session.scalar(select(model.attempt).where(model.id == message.id)) or 0
            session.add(Event(run_id=message.id, attempt=attempt, kind="resent", message=text,
                              level="warning", data={"reason": "unclaimed", "grace_seconds": grace_seconds}))
    else:
        log.debug("%s %s: message sent again", message.what, message.id)
    session.commit()


def run_reaper_forever(settings: Settings) -> None:
    """Runs a reaper pass every `reaper_interval_seconds` until the process is stopped."""
    sessions = make_session_factory(settings)
    celery = create_celery(settings)
    log.info("reaper started: lease %.1fs, queued grace %.1fs, every %.1fs", settings.lease_seconds,
             settings.queued_grace_seconds, settings.reaper_interval_seconds)
    while True:
        started = time.monotonic()
        try:
            with sessions() as session:
                now = utcnow()
                result = reap_once(session, now, lease_seconds=settings.lease_seconds,
                                   queued_grace_seconds=settings.queued_grace_seconds,
                                   max_attempts=settings.max_attempts)
                resend(session, celery, result, now, settings.queued_grace_seconds)
                # Fine-tuning jobs whose files finished validating while no validation task could
                # start them (a worker lost between its commit and that call).
                start_waiting_jobs(session, settings, celery)
        except Exception:  # the database or broker is away: the next pass tries again
            log.exception("reaper pass failed")
        time.sleep(max(0.0, settings.reaper_interval_seconds - (time.monotonic() - started)))
