"""The job state machines (runs and evals) on their own, and how a run's move carries its stages."""

from __future__ import annotations

import itertools

import pytest

from app.jobs.states import EVAL_STATES, RUN_STATES, STAGE_MOVES, IllegalTransition, StateMachine

RUN_ALLOWED = {
    ("queued", "running"), ("queued", "cancelled"),
    ("running", "succeeded"), ("running", "failed"), ("running", "cancelling"), ("running", "queued"),
    ("cancelling", "cancelled"), ("cancelling", "failed"), ("cancelling", "succeeded"),
    ("cancelling", "queued"),
    ("failed", "queued"), ("cancelled", "queued"),
}
EVAL_ALLOWED = {("queued", "running"), ("running", "succeeded"), ("running", "failed"), ("running", "queued")}
MACHINES = [(RUN_STATES, RUN_ALLOWED), (EVAL_STATES, EVAL_ALLOWED)]


@pytest.mark.parametrize(("machine", "allowed"), MACHINES, ids=["run", "eval"])
def test_table_is_exactly_the_allowed_set(machine: StateMachine, allowed: set) -> None:
    table = {(old, new) for old, targets in machine.transitions.items() for new in targets}
    assert table == allowed
    assert set(machine.transitions) == machine.active | machine.terminal
    assert not machine.active & machine.terminal


@pytest.mark.parametrize(("machine", "allowed", "old", "new"),
                         [(m, a, old, new) for m, a in MACHINES
                          for old, new in sorted(itertools.product(m.transitions, m.transitions))])
def test_values_enforce_the_table(machine: StateMachine, allowed: set, old: str, new: str) -> None:
    if (old, new) in allowed:
        assert machine.values("job_x", old, new)["status"] == new
    else:
        assert not machine.can(old, new)
        with pytest.raises(IllegalTransition, match=f"{machine.kind} job_x cannot go from {old} to {new}"):
            machine.values("job_x", old, new)


def test_timestamps_and_lease_follow_the_state() -> None:
    running = RUN_STATES.values("run_x", "queued", "running")
    assert running["heartbeat_at"] is not None
    failed = RUN_STATES.values("run_x", "running", "failed")
    assert failed["finished_at"] is not None and failed["lease_owner"] is None
    resumed = RUN_STATES.values("run_x", "failed", "queued")
    assert resumed["finished_at"] is None and resumed["queued_at"] is not None
    assert resumed["heartbeat_at"] is None
    requeued = EVAL_STATES.values("eval_x", "running", "queued")
    assert requeued["progress"] == 0.0 and requeued["lease_owner"] is None  # an eval starts over


def test_succeeded_is_final() -> None:
    assert RUN_STATES.transitions["succeeded"] == frozenset() == EVAL_STATES.transitions["succeeded"]


def test_stage_moves_follow_the_run() -> None:
    # every run status a stage move names is one the run can enter; stages only end when the run does
    assert set(STAGE_MOVES) <= set(RUN_STATES.transitions)
    assert STAGE_MOVES["cancelled"] == {"running": "cancelled", "pending": "cancelled"}
    assert "pending" not in STAGE_MOVES["failed"]  # a resume runs them
    assert set(STAGE_MOVES["queued"].values()) == {"pending"}
