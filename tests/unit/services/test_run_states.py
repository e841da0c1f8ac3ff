"""The run state machine table on its own."""

from __future__ import annotations

import itertools

import pytest

from app.db.models import Run
from app.services.run_states import (
    ACTIVE,
    TERMINAL,
    TRANSITIONS,
    IllegalTransition,
    can_transition,
    transition,
)

STATES = set(TRANSITIONS)
ALLOWED = {
    ("queued", "running"), ("queued", "cancelled"),
    ("running", "succeeded"), ("running", "failed"), ("running", "cancelling"), ("running", "queued"),
    ("cancelling", "cancelled"), ("cancelling", "failed"), ("cancelling", "succeeded"),
    ("cancelling", "queued"),
    ("failed", "queued"), ("cancelled", "queued"),
}


def _run(status: str) -> Run:
    return Run(id="run_x", team_id="team_x", status=status, base_model="m", spec={}, attempt=1)


def test_table_is_exactly_the_allowed_set() -> None:
    table = {(old, new) for old, targets in TRANSITIONS.items() for new in targets}
    assert table == ALLOWED
    assert STATES == ACTIVE | TERMINAL


@pytest.mark.parametrize(("old", "new"), sorted(itertools.product(STATES, STATES)))
def test_transition_enforces_the_table(old: str, new: str) -> None:
    run = _run(old)
    if (old, new) in ALLOWED:
        assert transition(run, new).status == new
    else:
        assert not can_transition(old, new)
        with pytest.raises(IllegalTransition, match=f"cannot go from {old} to {new}"):
            transition(run, new)
        assert run.status == old


def test_timestamps_follow_the_state() -> None:
    run = transition(_run("queued"), "running")
    assert run.started_at is not None and run.heartbeat_at is not None
    transition(run, "failed")
    assert run.finished_at is not None and run.lease_owner is None
    transition(run, "queued")  # resume
    assert run.finished_at is None and run.queued_at is not None


def test_succeeded_is_final() -> None:
    assert TRANSITIONS["succeeded"] == frozenset()
