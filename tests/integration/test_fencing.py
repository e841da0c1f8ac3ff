"""The lease rules on SQLite and PostgreSQL, in-process: one claim per message, a stale attempt's
writes refused, the reaper's re-queue / attempt cap / cancel-while-lost, and trackers that fail
without failing the run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app.db.migrate import migrate
from app.db.models import Event, Metric, Run, RunStage, Team, utcnow
from app.db.session import create_db_engine
from app.ids import new_id
from app.jobs.lease import Claim, Lease, StaleAttempt, claim
from app.jobs.reaper import reap_once
from app.jobs.states import RUN
from tests.api.conftest import PG_ADMIN, _pg_url
from trainer_core.reporting import RecordingReporter
from worker.reporter import DbReporter
from worker.trackers import MirroredReporter


@pytest.fixture(params=["sqlite", "postgres"], scope="module")
def sessions(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[sessionmaker]:
    if request.param == "sqlite":
        url, dbname = f"sqlite:///{tmp_path_factory.mktemp('fencing') / 'f.db'}", None
    else:
        dbname = f"tuneyard_fencing_{os.getpid()}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{dbname}"')
        url = _pg_url(dbname)
    migrate(url)
    engine = create_db_engine(url)
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    with factory() as session:
        session.add(Team(id="team_f", name="fencing"))
        session.commit()
    yield factory
    engine.dispose()
    if dbname:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


def new_run(sessions: sessionmaker, max_attempts: int = 3) -> str:
    with sessions() as session:
        run = Run(id=new_id("run"), team_id="team_f", base_model="tiny-llama", spec={},
                  max_attempts=max_attempts)
        run.stages = [RunStage(index=0, method="sft")]
        session.add(run)
        session.commit()
        return run.id


def age_heartbeat(sessions: sessionmaker, run_id: str, seconds: float) -> None:
    with sessions() as session:
        session.execute(update(Run).where(Run.id == run_id)
                        .values(heartbeat_at=utcnow() - timedelta(seconds=seconds)))
        session.commit()


def claim_run(session: Session, run_id: str, owner: str, now: datetime) -> Claim | None:
    return claim(session, RUN, run_id, owner, now, lease_seconds=3, max_attempts=3)


def reap(sessions: sessionmaker):  # noqa: ANN201
    with sessions() as session:
        return reap_once(session, utcnow(), lease_seconds=3, queued_grace_seconds=60)


def test_one_claim_per_run_and_stale_writes_refused(sessions: sessionmaker, tmp_path: Path) -> None:
    run_id = new_run(sessions)
    with sessions() as session:
        first = claim_run(session, run_id, "a", utcnow())
    with sessions() as session:
        assert claim_run(session, run_id, "b", utcnow()) is None  # the second delivery
    assert first is not None and first.attempt == 1 and first.resume_reason is None

    age_heartbeat(sessions, run_id, 10)
    assert reap(sessions).runs.requeued == [run_id]
    with sessions() as session:
        second = claim_run(session, run_id, "b", utcnow())
    assert second is not None and second.attempt == 2 and second.resume_reason == "after a lost worker"

    lease = Lease(sessions, RUN, run_id, 1, heartbeat_seconds=60)
    stale = DbReporter(sessions, tmp_path, first, "team_f", lease, flush_rows=1)
    with pytest.raises(StaleAttempt):
        stale.on_metrics(0, 5, "train", {"loss": 1.0})
    with pytest.raises(StaleAttempt):
        stale.on_event("stage_started", "late", {"stage_index": 0, "total_steps": 9})
    lease = Lease(sessions, RUN, run_id, 2, heartbeat_seconds=60)
    current = DbReporter(sessions, tmp_path, second, "team_f", lease)
    current.on_metrics(0, 5, "train", {"loss": 2.0, "nan": float("nan")})
    current.flush()
    with sessions() as session:
        rows = session.query(Metric).filter_by(run_id=run_id).all()
        assert [(r.step, r.values) for r in rows] == [(5, {"loss": 2.0, "nan": None})]
        assert not session.query(Event).filter_by(run_id=run_id, kind="stage_started").count()


def test_reaper_caps_attempts_and_ends_lost_cancels(sessions: sessionmaker) -> None:
    capped = new_run(sessions, max_attempts=1)
    cancelling = new_run(sessions)
    for run_id in (capped, cancelling):
        with sessions() as session:
            assert claim_run(session, run_id, "w", utcnow()) is not None
    with sessions() as session:
        session.execute(update(Run).where(Run.id == cancelling).values(status="cancelling"))
        session.commit()
    fresh = new_run(sessions)
    with sessions() as session:
        claim_run(session, fresh, "w", utcnow())
    for run_id in (capped, cancelling):
        age_heartbeat(sessions, run_id, 10)
    result = reap(sessions)
    assert result.runs.failed == [capped] and result.runs.cancelled == [cancelling]
    assert fresh not in result.runs.requeued
    with sessions() as session:
        run = session.get(Run, capped)
        assert run.status == "failed" and run.error["code"] == "attempts_exhausted"
        assert session.get(Run, cancelling).status == "cancelled"
        assert session.get(Run, fresh).status == "running"
        assert session.query(Event).filter_by(run_id=capped, kind="error").count() == 1


def test_unclaimed_queued_runs_are_sent_again(sessions: sessionmaker) -> None:
    run_id = new_run(sessions)
    with sessions() as session:
        session.execute(update(Run).where(Run.id == run_id).values(queued_at=utcnow() - timedelta(minutes=5)))
        session.commit()
    assert run_id in reap(sessions).runs.unclaimed


class ExplodingTracker:
    name = "exploding"

    def log_metrics(self, *args: object) -> None:
        raise ConnectionError("tracker server unreachable")

    def close(self, status: str) -> None:
        raise AssertionError("a switched-off tracker is not closed")


def test_a_failing_tracker_never_fails_the_run() -> None:
    inner = RecordingReporter()
    mirror = MirroredReporter(inner, [ExplodingTracker()])
    mirror.on_metrics(0, 1, "train", {"loss": 1.0})
    mirror.on_metrics(0, 2, "train", {"loss": 0.5})
    mirror.close("succeeded")
    assert [m[1] for m in inner.metrics] == [1, 2] and mirror.trackers == []
    assert inner.events[0][0] == "warning" and "unreachable" in inner.events[0][1]
