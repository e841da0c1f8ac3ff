"""The webhook outbox: an event row (and one delivery row per subscribed endpoint) written in the
same transaction as the state change it reports, so a change that committed always has its event
and a change that rolled back never does. The deliverer (worker/webhooks.py) sends them later.

Event types: OpenAI's `fine_tuning.job.succeeded|failed|cancelled` (payload data `{id}`, the job
id) and Tuneyard's own `run.succeeded|failed|cancelled` and `eval.succeeded|failed` (data `{id,
status}`). A paused job's run ends `cancelled` too: that is a `run.cancelled`, not a job event.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Eval, FineTuningJob, Run, WebhookDelivery, WebhookEndpoint, WebhookEvent, utcnow
from app.ids import new_id

JOB_EVENTS = ("fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled")
RUN_EVENTS = ("run.succeeded", "run.failed", "run.cancelled")
EVAL_EVENTS = ("eval.succeeded", "eval.failed")
EVENT_TYPES: tuple[str, ...] = JOB_EVENTS + RUN_EVENTS + EVAL_EVENTS
_ENDS = frozenset({"succeeded", "failed", "cancelled"})


def emit(session: Session, team_id: str, event_type: str, data: dict[str, Any]) -> WebhookEvent:
    """Returns the event added to the session with a pending delivery for each subscribed endpoint."""
    now = utcnow()
    event_id = new_id("evt")
    event = WebhookEvent(id=event_id, team_id=team_id, type=event_type, created_at=now, payload={
        "id": event_id, "object": "event", "created_at": int(now.timestamp()), "type": event_type,
        "data": data})
    session.add(event)
    session.flush()  # the event row before its deliveries (they reference it)
    subscribed = session.execute(select(WebhookEndpoint.id, WebhookEndpoint.event_types)
                                 .where(WebhookEndpoint.team_id == team_id)).all()
    for endpoint_id, types in subscribed:
        if event_type in types:
            session.add(WebhookDelivery(id=new_id("whdel"), event_id=event_id, endpoint_id=endpoint_id,
                                        status="pending", attempts=0, next_attempt_at=now, created_at=now))
    return event


def job_moved(session: Session, kind: str, job_id: str, status: str) -> None:
    """Adds the events of a run or an eval that just moved to `status` (only ends are announced)."""
    if status not in _ENDS:
        return
    if kind == "run":
        _run_ended(session, job_id, status)
    else:
        _eval_ended(session, job_id, status)


def _run_ended(session: Session, run_id: str, status: str) -> None:
    team_id = session.scalar(select(Run.team_id).where(Run.id == run_id))
    if team_id is None:
        return
    emit(session, team_id, f"run.{status}", {"id": run_id, "status": status})
    job = session.scalar(select(FineTuningJob).where(FineTuningJob.run_id == run_id))
    if job is not None and not (status == "cancelled" and job.paused):
        job_ended(session, job, status)


def job_ended(session: Session, job: FineTuningJob, status: str) -> None:
    """Adds the `fine_tuning.job.<status>` event of a job that just ended."""
    emit(session, job.team_id, f"fine_tuning.job.{status}", {"id": job.id})


def _eval_ended(session: Session, eval_id: str, status: str) -> None:
    team_id = session.scalar(select(Eval.team_id).where(Eval.id == eval_id))
    if team_id is not None:
        emit(session, team_id, f"eval.{status}", {"id": eval_id, "status": status})
