"""The run state machine: one table of allowed transitions, and `transition()` that enforces it.

    queued     → running (claimed) | cancelled (cancel before start)
    running    → succeeded | failed | cancelling (cancel requested) | queued (lease lost, re-queued)
    cancelling → cancelled | failed | succeeded (finished before it saw the flag) | queued (lease lost)
    failed     → queued (resume)
    cancelled  → queued (resume)
    succeeded  → (terminal)
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from sqlalchemy import update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from app.db.models import Run, utcnow
from app.services import outbox

RunStatus = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]

TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelled"}),
    "running": frozenset({"succeeded", "failed", "cancelling", "queued"}),
    "cancelling": frozenset({"cancelled", "failed", "succeeded", "queued"}),
    "failed": frozenset({"queued"}),
    "cancelled": frozenset({"queued"}),
    "succeeded": frozenset(),
}
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE = frozenset({"queued", "running", "cancelling"})


class IllegalTransition(ValueError):
    def __init__(self, run_id: str, old: str, new: str) -> None:
        allowed = ", ".join(sorted(TRANSITIONS.get(old, ()))) or "none"
        super().__init__(f"run {run_id} cannot go from {old} to {new} (allowed from {old}: {allowed})")
        self.old = old
        self.new = new


def can_transition(old: str, new: str) -> bool:
    return new in TRANSITIONS.get(old, frozenset())


def transition_values(run_id: str, old: str, new: str, now: datetime | None = None) -> dict[str, Any]:
    """Returns the column values a move from `old` to `new` sets; raises IllegalTransition."""
    if not can_transition(old, new):
        raise IllegalTransition(run_id, old, new)
    now = now or utcnow()
    values: dict[str, Any] = {"status": new}
    if new == "queued":
        values.update(queued_at=now, resent_at=None, finished_at=None, lease_owner=None, heartbeat_at=None)
    elif new == "running":
        values.update(heartbeat_at=now)
    elif new in TERMINAL:
        values.update(finished_at=now, lease_owner=None)
    return values


def transition(run: Run, new: str, *, now: datetime | None = None) -> Run:
    """Returns the run object moved to `new` (in memory); raises IllegalTransition."""
    values = transition_values(run.id, run.status, new, now)
    if new == "running" and run.started_at is None:
        values["started_at"] = values["heartbeat_at"]
    for column, value in values.items():
        setattr(run, column, value)
    return run


def transition_atomically(session: Session, run: Run, new: str, **extra: Any) -> bool:
    """Returns True if one guarded UPDATE (… WHERE status = the status we read) moved the run.

    False means another process changed the run first; the object is then refreshed from the
    database. `extra` columns (lease owner, attempt, error) are set in the same UPDATE.
    """
    old = run.status
    values = {**transition_values(run.id, old, new), **extra}
    if new == "running" and run.started_at is None:
        values.setdefault("started_at", values["heartbeat_at"])
    result = session.execute(
        update(Run).where(Run.id == run.id, Run.status == old).values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        session.rollback()
        session.refresh(run)
        return False
    for column, value in values.items():
        set_committed_value(run, column, value)
    outbox.run_ended(session, run.id, new)
    return True
