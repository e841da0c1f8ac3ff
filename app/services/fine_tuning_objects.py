"""The API objects of fine-tuning jobs: the job, its events (the run's events and metrics, newest
first as OpenAI lists them) and its checkpoints (the run's resume checkpoints, named
`{fine_tuned_model}:ckpt-step-{N}`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Checkpoint, Event, FineTuningJob, Metric, Team
from app.errors import Unprocessable
from app.schemas.common import OpenAIPage
from app.schemas.fine_tuning import (
    CheckpointMetrics,
    JobCheckpointOut,
    JobError,
    JobEventOut,
    JobHyperparameters,
    JobOut,
)
from app.services.fine_tuned_models import checkpoint_name
from app.services.fine_tuning import get_job, hyperparameters_of, job_run, job_status
from app.services.metrics import run_progress
from app.services.pagination import paginate

_EVENT_ID = re.compile(r"^ftevent_(?P<source>[jem])(?P<id>\d+)$")
_LEVELS = {"warning": "warn", "error": "error"}


def _ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def job_out(session: Session, job: FineTuningJob) -> JobOut:
    run = job_run(session, job)
    status = job_status(job, run)
    error = job.error or (run.error if run is not None and status == "failed" else None)
    hyper = hyperparameters_of(job.method)
    eta = None
    if run is not None and run.status == "running":
        seconds = run_progress(run).eta_seconds
        eta = _ts(run.heartbeat_at) + int(seconds) if seconds is not None and run.heartbeat_at else None
    return JobOut(
        id=job.id, created_at=_ts(job.created_at) or 0,
        error=JobError(code=error.get("code", "error"), message=error.get("message", ""),
                       param=error.get("param")) if error else None,
        fine_tuned_model=job.fine_tuned_model if status == "succeeded" else None,
        finished_at=_ts(run.finished_at if run is not None else job.finished_at) if status in (
            "succeeded", "failed", "cancelled") else None,
        hyperparameters=JobHyperparameters(**{k: hyper.get(k) for k in JobHyperparameters.model_fields}),
        model=job.model, organization_id=job.team_id, seed=job.seed, status=status,
        training_file=job.training_file, validation_file=job.validation_file, estimated_finish=eta,
        integrations=job.integrations, metadata=job.job_metadata, method=job.method, run_id=job.run_id,
    )


def list_jobs(session: Session, team: Team, *, limit: int, after: str | None,
              metadata: dict[str, str]) -> OpenAIPage[JobOut]:
    """Returns the team's jobs, newest first; `metadata` keeps jobs holding every given pair."""
    stmt = select(FineTuningJob).where(FineTuningJob.team_id == team.id)
    if not metadata:
        rows, has_more, _ = paginate(session, stmt, FineTuningJob.id, limit=limit, after=after)
    else:
        # JSON columns are filtered here rather than in SQL: the same code serves SQLite and PostgreSQL.
        if after is not None:
            stmt = stmt.where(FineTuningJob.id < after)
        matching = [j for j in session.scalars(stmt.order_by(FineTuningJob.id.desc()))
                    if all((j.job_metadata or {}).get(k) == v for k, v in metadata.items())]
        rows, has_more = matching[:limit], len(matching) > limit
    data = [job_out(session, j) for j in rows]
    return OpenAIPage[JobOut](data=data, has_more=has_more, first_id=data[0].id if data else None,
                              last_id=data[-1].id if data else None)


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class _Item:
    at: datetime
    source: str  # j: the job's own, e: a run event, m: a metrics point
    id: int
    event: JobEventOut

    @property
    def key(self) -> tuple[datetime, str, int]:
        return self.at, self.source, self.id


def _job_items(job: FineTuningJob) -> list[_Item]:
    files = job.training_file + (f" and {job.validation_file}" if job.validation_file else "")
    items = [_Item(job.created_at, "j", 0, JobEventOut(
        id="ftevent_j0", created_at=_ts(job.created_at) or 0, level="info",
        message=f"Created fine-tuning job {job.id}: validating {files}"))]
    if job.run_id is None and job.finished_at is not None:
        error = job.error or {}
        level = "error" if job.status == "failed" else "info"
        message = error.get("message") or f"Fine-tuning job {job.status}"
        items.append(_Item(job.finished_at, "j", 1, JobEventOut(
            id="ftevent_j1", created_at=_ts(job.finished_at) or 0, level=level, message=message,
            data={"code": error["code"]} if error else None)))
    return items


def _event_item(e: Event) -> _Item:
    data = dict(e.data or {})
    data.setdefault("kind", e.kind)
    return _Item(e.created_at, "e", e.id, JobEventOut(
        id=f"ftevent_e{e.id}", created_at=_ts(e.created_at) or 0, level=_LEVELS.get(e.level, "info"),  # type: ignore[arg-type]
        message=e.message, data=data))


def _metric_item(m: Metric, total_steps: int | None) -> _Item:
    values = m.values or {}
    if m.split == "eval":
        data = {"step": m.step, "valid_loss": values.get("eval_loss"),
                "valid_mean_token_accuracy": values.get("eval_mean_token_accuracy")}
        text = f"Step {m.step}: validation loss={values.get('eval_loss')}"
    else:
        data = {"step": m.step, "train_loss": values.get("loss"),
                "train_mean_token_accuracy": values.get("mean_token_accuracy"), "total_steps": total_steps}
        text = f"Step {m.step}/{total_steps}: training loss={values.get('loss')}"
    extra = {k: v for k, v in values.items() if k not in ("loss", "mean_token_accuracy", "eval_loss")}
    return _Item(m.created_at, "m", m.id, JobEventOut(
        id=f"ftevent_m{m.id}", created_at=_ts(m.created_at) or 0, level="info", message=text, type="metrics",
        data={**data, **extra}))


def list_job_events(session: Session, team: Team, job_id: str, *, limit: int,
                    after: str | None) -> OpenAIPage[JobEventOut]:
    """Returns the job's events newest first, after the cursor (the id of the last event of a page)."""
    job = get_job(session, team, job_id)
    run = job_run(session, job)
    bound = _cursor_key(session, job, after)
    items = [i for i in _job_items(job) if bound is None or i.key < bound]
    if run is not None:
        total = run.stages[0].total_steps if run.stages else None
        # Each source gives its newest rows up to the bound's time; the exact order is settled below.
        window = limit + 1
        events = select(Event).where(Event.run_id == run.id)
        metrics = select(Metric).where(Metric.run_id == run.id)
        if bound is not None:
            events = events.where(Event.created_at <= bound[0])
            metrics = metrics.where(Metric.created_at <= bound[0])
        items += [_event_item(e) for e in session.scalars(
            events.order_by(Event.created_at.desc(), Event.id.desc()).limit(window + 50))]
        items += [_metric_item(m, total) for m in session.scalars(
            metrics.order_by(Metric.created_at.desc(), Metric.id.desc()).limit(window + 50))]
        items = [i for i in items if bound is None or i.key < bound]
    items.sort(key=lambda i: i.key, reverse=True)
    page = [i.event for i in items[:limit]]
    return OpenAIPage[JobEventOut](data=page, has_more=len(items) > limit,
                                   first_id=page[0].id if page else None,
                                   last_id=page[-1].id if page else None)


def _cursor_key(session: Session, job: FineTuningJob, after: str | None) -> tuple[datetime, str, int] | None:
    if after is None:
        return None
    match = _EVENT_ID.match(after)
    if match is None:
        raise Unprocessable(f"after: {after!r} is not an event id of this job (ftevent_…)", param="after")
    source, row_id = match["source"], int(match["id"])
    at: datetime | None
    if source == "j":
        at = job.created_at if row_id == 0 else job.finished_at
    elif source == "e":
        at = session.scalar(select(Event.created_at).where(Event.id == row_id, Event.run_id == job.run_id))
    else:
        at = session.scalar(select(Metric.created_at).where(Metric.id == row_id, Metric.run_id == job.run_id))
    if at is None:
        raise Unprocessable(f"after: no event {after!r} in job {job.id}", param="after")
    return at, source, row_id


# ---------------------------------------------------------------- checkpoints


def list_job_checkpoints(session: Session, team: Team, job_id: str, *, limit: int,
                         after: str | None) -> OpenAIPage[JobCheckpointOut]:
    """Returns the job's live checkpoints newest first, with the train and eval metrics of their step."""
    job = get_job(session, team, job_id)
    if job.run_id is None:
        return OpenAIPage[JobCheckpointOut](data=[], has_more=False)
    stmt = select(Checkpoint).where(Checkpoint.run_id == job.run_id, Checkpoint.kind == "resume",
                                    Checkpoint.deleted_at.is_(None))
    rows, has_more, _ = paginate(session, stmt, Checkpoint.id, limit=limit, after=after)
    points = _points(session, job.run_id, [c.step for c in rows])
    data = [JobCheckpointOut(
        id=c.id, created_at=_ts(c.created_at) or 0, fine_tuned_model_checkpoint=checkpoint_name(job, c.step),
        fine_tuning_job_id=job.id, step_number=c.step,
        metrics=_checkpoint_metrics(c.step, points.get((c.step, "train"), {}),
                                    {**c.metrics, **points.get((c.step, "eval"), {})}))
        for c in rows]
    return OpenAIPage[JobCheckpointOut](data=data, has_more=has_more, first_id=data[0].id if data else None,
                                        last_id=data[-1].id if data else None)


def _points(session: Session, run_id: str, steps: list[int]) -> dict[tuple[int, str], dict[str, Any]]:
    rows = session.scalars(select(Metric).where(Metric.run_id == run_id, Metric.stage_index == 0,
                                                Metric.step.in_(steps))).all()
    return {(m.step, m.split): m.values for m in rows}


def _checkpoint_metrics(step: int, train: dict[str, Any], evaluation: dict[str, Any]) -> CheckpointMetrics:
    valid_loss = evaluation.get("eval_loss")
    valid_accuracy = evaluation.get("eval_mean_token_accuracy")
    return CheckpointMetrics(step=step, train_loss=train.get("loss"),
                             train_mean_token_accuracy=train.get("mean_token_accuracy"),
                             valid_loss=valid_loss, valid_mean_token_accuracy=valid_accuracy,
                             full_valid_loss=valid_loss, full_valid_mean_token_accuracy=valid_accuracy)
