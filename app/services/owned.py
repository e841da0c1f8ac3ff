"""The one way a request reaches a team's resource: by id, scoped to the team, or 404.

Another team's resource answers exactly like a missing one, so ids of other teams leak nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from sqlalchemy.orm import Session
from sqlalchemy.orm.interfaces import ORMOption

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


def get_owned(session: Session, model: type[T], team: Team, object_id: str, *,
              options: Sequence[ORMOption] = ()) -> T:
    """Returns the team's row of `model` with this id; 404 for a malformed, missing or another team's id.

    `options` shape the one SELECT (e.g. `joinedload(Run.stages)`: the run with its stages).
    """
    row = session.get(model, object_id, options=options) if is_id(object_id, OWNED[model][1]) else None
    if row is None or row.team_id != team.id:
        raise not_found(model, object_id)
    return row


def not_found(model: type, object_id: str) -> NotFound:
    """Returns the 404 of a missing (or another team's) resource."""
    what, _, param = OWNED[model]
    return NotFound(f"no {what} {object_id!r}", param=param)
