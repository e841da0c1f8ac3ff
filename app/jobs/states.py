"""The state machines of the two job kinds, and how a run's move carries its stages along.

Runs:
    queued     → running (claimed) | cancelled (cancel before start)
    running    → succeeded | failed | cancelling (cancel requested) | queued (lease lost, re-queued)
    cancelling → cancelled | failed | succeeded (finished before it saw the flag) | queued (lease lost)
    failed     → queued (resume)
    cancelled  → queued (resume)
    succeeded  → (terminal)
Evals:
    queued     → running (claimed)
    running    → succeeded | failed | queued (lease lost, re-queued; the next attempt starts over)
    succeeded, failed → (terminal)

A claim is the one move not checked against the table here: it also takes a `running` job whose
lease expired, in one guarded UPDATE (`app.jobs.lease.claim`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Integer, case, literal, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from app.db.models import Eval, Run, RunStage, utcnow
from app.services import outbox


class IllegalTransition(ValueError):
    def __init__(self, kind: str, job_id: str, old: str, new: str, allowed: frozenset[str]) -> None:
        names = ", ".join(sorted(allowed)) or "none"
        super().__init__(f"{kind} {job_id} cannot go from {old} to {new} (allowed from {old}: {names})")
        self.old = old
        self.new = new


@dataclass(frozen=True)
class StateMachine:
    """One kind's table of allowed moves and the column values each move sets."""

    kind: str
    transitions: Mapping[str, frozenset[str]]
    terminal: frozenset[str]
    # Extra values on entering a status (an eval going back to `queued` starts over from 0 %).
    on_enter: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def active(self) -> frozenset[str]:
        return frozenset(self.transitions) - self.terminal

    def can(self, old: str, new: str) -> bool:
        return new in self.transitions.get(old, frozenset())

    def values(self, job_id: str, old: str, new: str, now: datetime | None = None) -> dict[str, Any]:
        """Returns the column values a move from `old` to `new` sets; raises IllegalTransition."""
        if not self.can(old, new):
            raise IllegalTransition(self.kind, job_id, old, new, self.transitions.get(old, frozenset()))
        now = now or utcnow()
        values: dict[str, Any] = {"status": new}
        if new == "queued":
            values.update(queued_at=now, resent_at=None, finished_at=None, lease_owner=None,
                          heartbeat_at=None)
        elif new == "running":
            values.update(heartbeat_at=now)
        elif new in self.terminal:
            values.update(finished_at=now, lease_owner=None)
        values.update(self.on_enter.get(new, {}))
        return values


RUN_STATES = StateMachine(
    "run",
    {
        "queued": frozenset({"running", "cancelled"}),
        "running": frozenset({"succeeded", "failed", "cancelling", "queued"}),
        "cancelling": frozenset({"cancelled", "failed", "succeeded", "queued"}),
        "failed": frozenset({"queued"}),
        "cancelled": frozenset({"queued"}),
        "succeeded": frozenset(),
    },
    terminal=frozenset({"succeeded", "failed", "cancelled"}),
)
EVAL_STATES = StateMachine(
    "eval",
    {
        "queued": frozenset({"running"}),
        "running": frozenset({"succeeded", "failed", "queued"}),
        "succeeded": frozenset(),
        "failed": frozenset(),
    },
    terminal=frozenset({"succeeded", "failed"}),
    on_enter={"queued": {"progress": 0.0}},
)

# What a run's move does to its stages: {stage status before: stage status after}, by the run's
# new status. Stages not named keep their status (a failed run's pending stages stay pending, so
# a resume runs them).
STAGE_MOVES: Mapping[str, Mapping[str, str]] = {
    "queued": {"running": "pending", "failed": "pending", "cancelled": "pending"},
    "succeeded": {"running": "succeeded"},
    "failed": {"running": "failed"},
    "cancelled": {"running": "cancelled", "pending": "cancelled"},
}
STAGE_ENDS = ("succeeded", "failed", "cancelled")


def after_move(session: Session, kind: JobKind, job_id: str, new_status: str, now: datetime) -> None:
    """Writes what follows every move of a job, in the move's transaction: a run's stages move with
    it, and an end (succeeded, failed, cancelled) goes into the webhook outbox."""
    if kind.has_stages:
        move_stages(session, job_id, new_status, now)
    outbox.job_moved(session, kind.name, job_id, new_status)


def move_stages(session: Session, run_id: str, run_status: str, now: datetime | None = None) -> None:
    """Moves the run's stages along with the run's move to `run_status` (one UPDATE; none if no change)."""
    moves = STAGE_MOVES.get(run_status)
    if not moves:
        return
    values: dict[str, Any] = {"status": case(moves, value=RunStage.status)}
    ends = [old for old, new in moves.items() if new in STAGE_ENDS]
    if ends:
        values["finished_at"] = case((RunStage.status.in_(ends), now or utcnow()), else_=RunStage.finished_at)
    session.execute(update(RunStage).where(RunStage.run_id == run_id, RunStage.status.in_(list(moves)))
                    .values(**values).execution_options(synchronize_session=False))


@dataclass(frozen=True)
class JobKind:
    """What the claim, the fence, the lease and the reaper need to know about one kind of job."""

    name: str
    model: type[Run] | type[Eval]
    states: StateMachine
    task: str  # the Celery task that works on one job of this kind
    live: tuple[str, ...]  # the statuses in which an attempt holds the lease
    claim_values: Mapping[str, Any]  # reset by every claim (an eval's attempt starts over)
    error: Callable[[str, str], dict[str, Any]]  # the stored error object of this kind
    has_stages: bool  # runs: stages move with the run, and events record what happened

    def cap(self, max_attempts: int) -> Any:
        """Returns the attempt cap: the row's own (runs carry one) or the setting."""
        own = getattr(self.model, "max_attempts", None)
        return literal(max_attempts, Integer) if own is None else own


RUN = JobKind(
    name="run", model=Run, states=RUN_STATES, task="tuneyard.train_run", live=("running", "cancelling"),
    claim_values={}, error=lambda code, message: {"code": code, "message": message}, has_stages=True,
)
EVAL = JobKind(
    name="eval", model=Eval, states=EVAL_STATES, task="tuneyard.run_eval", live=("running",),
    claim_values={"progress": 0.0, "results": None},
    error=lambda code, message: {"type": code, "message": message, "model": None}, has_stages=False,
)


def transition_atomically(session: Session, kind: JobKind, row: Run | Eval, new: str, **extra: Any) -> bool:
    """Returns True if one guarded UPDATE (… WHERE status = the status we read) moved the job.

    A run's stages move with it in the same transaction. False means another process changed
    the job first; the object is then refreshed from the database. `extra` columns (lease owner,
    attempt, error) are set in the same UPDATE. The caller commits.
    """
    old = row.status
    now = utcnow()
    values = {**kind.states.values(row.id, old, new, now), **extra}
    if new == "running" and getattr(row, "started_at", False) is None:
        values.setdefault("started_at", values["heartbeat_at"])
    model = kind.model
    result = session.execute(
        update(model).where(model.id == row.id, model.status == old).values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        session.rollback()
        session.refresh(row)
        return False
    for column, value in values.items():
        set_committed_value(row, column, value)
    after_move(session, kind, row.id, new, now)
    if kind.has_stages:
        session.expire(row, ["stages"])
    return True
