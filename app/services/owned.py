"""The one way a request reaches a team's resource: by id, scoped to the team, or 404.

Another team's resource answers exactly like a missing one, so ids of other teams leak nothing.
"""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy.orm import Session

from app.db.models import Checkpoint, Dataset, Eval, FineTuningJob, Run, Team, WebhookEndpoint
from app.errors import NotFound
from app.ids import is_id

T = TypeVar("T", Run, Dataset, Eval, Checkpoint, FineTuningJob, WebhookEndpoint)

# model: (what the error calls it, id prefix, the parameter that carried the id)
OWNED: dict[type, tuple[str, str, str]] = {
    Run: ("run", "run", "run_id"),
    Dataset: ("dataset", "ds", "dataset_id"),
    Eval: ("eval", "eval", "eval_id"),
    Checkpoint: ("checkpoint", "ckpt", "checkpoint_id"),
    FineTuningJob: ("fine-tuning job", "ftjob", "fine_tuning_job_id"),
    WebhookEndpoint: ("webhook endpoint", "whep", "webhook_endpoint_id"),
}


def get_owned(session: Session, model: type[T], team: Team, object_id: str, *, code: str | None = None) -> T:
    """Returns the team's row of `model` with this id; 404 for a malformed, missing or another team's id."""
    what, prefix, param = OWNED[model]
    row = session.get(model, object_id) if is_id(object_id, prefix) else None
    if row is None or row.team_id != team.id:
        raise NotFound(f"no {what} {object_id!r}", code=code, param=param)
    return row
