"""The reaper: the database decides what needs work, the broker is only told again.

Each pass (`reap_once`):
- a `running` run whose heartbeat is older than `lease_seconds` lost its worker: back to `queued`
  (its next attempt resumes from the last complete checkpoint), or `failed` when its attempts
  are spent; a `cancelling` one ends `cancelled`;
- a `queued` run nobody claimed within `queued_grace_seconds` gets its message sent again (the
  broker lost it: Redis restarted, the filesystem transport has no redelivery, a worker died
  holding it unacknowledged).
Every change is one guarded UPDATE that re-checks the heartbeat, so a run whose worker beat in
the meantime is left alone. Messages are sent after the commit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from celery import Celery
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.broker import create_celery, send_task
from app.db.models import Event, Run, utcnow
from app.db.session import make_session_factory
from app.services.execution import set_stages
from app.services.run_states import transition_values
from app.settings import Settings

log = logging.getLogger("tuneyard.reaper")


@dataclass
class ReapResult:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    resend: list[str] = field(default_factory=list)


def reap_once(session: Session, now: datetime, *, lease_seconds: float,
              queued_grace_seconds: float) -> ReapResult:
    """Returns what one pass changed (committed) and which queued runs need their message sent again."""
    result = ReapResult()
    cutoff = now - timedelta(seconds=lease_seconds)
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
                       f"{attempt + 1} "
                       f"of {max_attempts}, resuming from the last checkpoint")
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
        session.commit()
        log.warning("run %s: %s", run_id, message)
        by_target = {"queued": result.requeued, "failed": result.failed, "cancelled": result.cancelled}
        by_target[target].append(run_id)
        if target == "queued":
            result.resend.append(run_id)
    grace_cutoff = now - timedelta(seconds=queued_grace_seconds)
    unclaimed = session.scalars(select(Run.id).where(Run.status == "queued", or_(
        Run.queued_at.is_(None), Run.queued_at < grace_cutoff))).all()
    result.resend.extend(run_id for run_id in unclaimed if run_id not in result.resend)
    return result


def resend(session: Session, celery: Celery, run_ids: list[str], now: datetime) -> int:
    """Sends the runs' messages again; returns how many went out (each restarts its grace period)."""
    sent = 0
    for run_id in run_ids:
        if not send_task(celery, "tuneyard.train_run", [run_id]):
            break  # the broker is down: try the rest on the next pass
        session.execute(update(Run).where(Run.id == run_id, Run.status == "queued").values(queued_at=now)
                        .execution_options(synchronize_session=False))
        session.commit()
        sent += 1
    return sent


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
                                   queued_grace_seconds=settings.queued_grace_seconds)
                if result.resend:
                    sent = resend(session, celery, result.resend, now)
                    log.info("re-sent %d of %d queued runs to the broker", sent, len(result.resend))
        except Exception:  # the database or broker is away: the next pass tries again
            log.exception("reaper pass failed")
        time.sleep(max(0.0, settings.reaper_interval_seconds - (time.monotonic() - started)))
