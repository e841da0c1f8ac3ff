"""The model names of fine-tuning jobs: `ft:{base}:{team}:{suffix}:{job id}` for a succeeded job's
final adapter and `…:ckpt-step-{N}` for each of its live checkpoints — which checkpoint a name
stands for, and the names a team can use (`GET /v1/models`).
"""

from __future__ import annotations

import re
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Checkpoint, FineTuningJob, Run, Team
from app.schemas.models import ModelOut

_CHECKPOINT_SUFFIX = re.compile(r"^(?P<model>ft:.+):ckpt-step-(?P<step>\d+)$")


def _ts(value: datetime | None) -> int:
    return int(value.timestamp()) if value is not None else 0


def checkpoint_name(job: FineTuningJob, step: int) -> str:
    return f"{job.fine_tuned_model}:ckpt-step-{step}"


def checkpoint_for_model_name(session: Session, team: Team, name: str) -> Checkpoint | None:
    """Returns the checkpoint behind `ft:…` (the job's final adapter) or `ft:…:ckpt-step-N`, if any.

    A step that is the run's last step names the final adapter export (the same weights); earlier
    steps name that step's resume checkpoint.
    """
    match = _CHECKPOINT_SUFFIX.match(name)
    model, step = (match["model"], int(match["step"])) if match else (name, None)
    job = session.scalar(select(FineTuningJob).where(FineTuningJob.team_id == team.id,
                                                     FineTuningJob.fine_tuned_model == model))
    if job is None or job.run_id is None:
        return None
    live = select(Checkpoint).where(Checkpoint.run_id == job.run_id, Checkpoint.deleted_at.is_(None))
    export = session.scalars(live.where(Checkpoint.kind == "adapter")
                             .order_by(Checkpoint.step.desc())).first()
    if step is None or (export is not None and export.step == step):
        run = session.get(Run, job.run_id)
        return export if run is not None and run.status == "succeeded" else None
    return session.scalars(live.where(Checkpoint.kind == "resume", Checkpoint.step == step)).first()


def fine_tuned_models(session: Session, team: Team) -> list[ModelOut]:
    """Returns the team's `ft:` model names that serve: succeeded jobs, then each one's live checkpoints."""
    rows = session.execute(
        select(FineTuningJob, Run).join(Run, Run.id == FineTuningJob.run_id)
        .where(FineTuningJob.team_id == team.id, Run.status == "succeeded")
        .order_by(FineTuningJob.created_at)).all()
    models: list[ModelOut] = []
    for job, run in rows:
        models.append(ModelOut(id=job.fine_tuned_model, created=_ts(run.finished_at or job.created_at),
                               owned_by=team.name, kind="adapter"))
        for ckpt in session.scalars(select(Checkpoint).where(
                Checkpoint.run_id == run.id, Checkpoint.kind == "resume", Checkpoint.deleted_at.is_(None))
                .order_by(Checkpoint.step)):
            models.append(ModelOut(id=checkpoint_name(job, ckpt.step), created=_ts(ckpt.created_at),
                                   owned_by=team.name, kind="adapter"))
    return models
