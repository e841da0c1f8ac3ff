"""Reaper and lease rules beyond the run claim, on SQLite and PostgreSQL, in-process: evals claimed
once and fenced, re-queued when their worker is lost and failed when attempts are spent; unclaimed
runs, evals and validating datasets re-sent at most once per grace period (a run's events say so
once); checkpoints a dead attempt wrote but never registered are registered by the next attempt;
event text numbers stages from 1."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import sessionmaker

from app.db.models import Checkpoint, Dataset, Eval, Event, Run, RunStage, utcnow
from app.ids import new_id
from app.jobs.lease import Lease, StaleAttempt, claim, end_attempt, fence, requeue_attempt
from app.jobs.reaper import reap_once, resend
from app.jobs.states import EVAL, RUN
from app.services.metrics import run_progress
from tests.integration.test_fencing import claim_run, new_run, sessions  # noqa: F401 - the fixture, both databases
from worker.reporter import DbReporter, event_text

GRACE = 60


class RecordingCelery:
    """Stands in for the Celery app: records what `send_task` publishes, or fails like a dead broker."""

    def __init__(self, down: bool = False) -> None:
        self.down = down
        self.sent: list[tuple[str, str]] = []

    def send_task(self, name: str, args: list[Any], **_: Any) -> None:
        if self.down:
            raise ConnectionError("broker unreachable")
        self.sent.append((name, args[0]))


def new_eval(sessions: sessionmaker) -> str:  # noqa: F811
    with sessions() as session:
        row = Eval(id=new_id("eval"), team_id="team_f", status="queued", request={})
        session.add(row)
        session.commit()
        return row.id


def age(sessions: sessionmaker, model: Any, row_id: str, **seconds_ago: float) -> None:  # noqa: F811
    with sessions() as session:
        values = {column: utcnow() - timedelta(seconds=s) for column, s in seconds_ago.items()}
        session.execute(update(model).where(model.id == row_id).values(**values))
        session.commit()


def reap(sessions: sessionmaker, max_attempts: int = 3, later_s: float = 0):  # noqa: ANN201, F811
    with sessions() as session:
        return reap_once(session, utcnow() + timedelta(seconds=later_s), lease_seconds=3,
                         queued_grace_seconds=GRACE, max_attempts=max_attempts)


def test_evals_are_claimed_once_fenced_requeued_and_capped(sessions: sessionmaker) -> None:  # noqa: F811
    eval_id = new_eval(sessions)
    with sessions() as session:
        assert claim(session, EVAL, eval_id, "a", utcnow(), lease_seconds=3, max_attempts=2).attempt == 1
        assert claim(session, EVAL, eval_id, "b", utcnow(), lease_seconds=3, max_attempts=2) is None
        fence(session, EVAL, eval_id, 1, progress=0.5)
        session.commit()

    age(sessions, Eval, eval_id, heartbeat_at=10)
    result = reap(sessions, max_attempts=2)
    assert result.evals.requeued == [eval_id] and eval_id not in result.evals.unclaimed
    with sessions() as session:
        row = session.get(Eval, eval_id)
        assert (row.status, row.attempt, row.progress, row.lease_owner) == ("queued", 1, 0.0, None)
        with pytest.raises(StaleAttempt):  # the lost worker's late write
            end_attempt(session, EVAL, eval_id, 1, "succeeded")
        assert claim(session, EVAL, eval_id, "b", utcnow(), lease_seconds=3, max_attempts=2).attempt == 2

    age(sessions, Eval, eval_id, heartbeat_at=10)
    lease = Lease(sessions, EVAL, eval_id, 2, heartbeat_seconds=0.05).start()
    time.sleep(0.5)
    assert reap(sessions, max_attempts=2).evals.failed == []  # the heartbeat keeps it
    lease.stop()
    assert not lease.lost.is_set() and not lease.should_stop()

    age(sessions, Eval, eval_id, heartbeat_at=10)
    assert reap(sessions, max_attempts=2).evals.failed == [eval_id]
    with sessions() as session:
        row = session.get(Eval, eval_id)
        assert row.status == "failed" and row.error["type"] == "attempts_exhausted"
        assert "last allowed attempt (2)" in row.error["message"] and row.finished_at is not None
        assert claim(session, EVAL, eval_id, "c", utcnow(), lease_seconds=3, max_attempts=2) is None


def test_unclaimed_jobs_are_resent_at_most_once_per_grace_period(sessions: sessionmaker) -> None:  # noqa: F811
    run_id, eval_id = new_run(sessions), new_eval(sessions)
    with sessions() as session:
        dataset = Dataset(id=new_id("ds"), team_id="team_f", name="d", size_bytes=1, sha256="0" * 64,
                          blob_key="datasets/x.jsonl")
        session.add(dataset)
        session.commit()
        dataset_id = dataset.id
    age(sessions, Run, run_id, queued_at=300)
    age(sessions, Eval, eval_id, queued_at=300)
    age(sessions, Dataset, dataset_id, created_at=300)

    first = reap(sessions)
    assert run_id in first.runs.unclaimed and eval_id in first.evals.unclaimed
    assert dataset_id in first.datasets
    with sessions() as session:  # a dead broker: nothing is recorded, the next pass tries again
        assert resend(session, RecordingCelery(down=True), first, utcnow(), GRACE) == 0
    assert run_id in reap(sessions).runs.unclaimed
    celery = RecordingCelery()
    with sessions() as session:
        resend(session, celery, first, utcnow(), GRACE)
    assert {("tuneyard.train_run", run_id), ("tuneyard.run_eval", eval_id),
            ("tuneyard.validate_dataset", dataset_id)} <= set(celery.sent)

    soon = reap(sessions, later_s=GRACE / 2)  # the busy worker gets no second copy within the grace period
    assert run_id not in soon.runs.unclaimed and eval_id not in soon.evals.unclaimed
    assert dataset_id not in soon.datasets
    later = reap(sessions, later_s=GRACE + 1)
    assert run_id in later.runs.unclaimed and eval_id in later.evals.unclaimed
    assert dataset_id in later.datasets
    with sessions() as session:
        resend(session, RecordingCelery(), later, utcnow() + timedelta(seconds=GRACE + 1), GRACE)
        resent = session.scalars(select(Event).where(Event.run_id == run_id, Event.kind == "resent")).all()
        assert len(resent) == 1 and f"within {GRACE}s" in resent[0].message  # said once, not per re-send
        run = session.get(Run, run_id)
        assert run.resent_at is not None and run.queued_at < utcnow() - timedelta(seconds=200)

    with sessions() as session:  # a new queued period (lost worker) starts without a re-send
        claimed = claim_run(session, run_id, "w", utcnow())
        requeue_attempt(session, run_id, claimed.attempt, kind="retrying", message="system error")
        session.commit()
        assert session.get(Run, run_id).resent_at is None


def write_folder(folder: Path, manifest: dict[str, Any] | None) -> None:
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"w" * 10)
    if manifest is not None:
        files = [{"path": "weights.bin", "size": 10, "sha256": "ab" * 32}]
        (folder / "manifest.json").write_text(json.dumps({**manifest, "files": files}))


def test_checkpoints_written_but_not_registered_are_registered_by_the_next_attempt(
        sessions: sessionmaker, tmp_path: Path) -> None:  # noqa: F811
    run_id = new_run(sessions)
    with sessions() as session:
        claimed = claim_run(session, run_id, "w", utcnow())
    work = tmp_path / "runs" / run_id / "work"
    lease = Lease(sessions, RUN, run_id, claimed.attempt, heartbeat_seconds=60)
    reporter = DbReporter(sessions, tmp_path, claimed, "team_f", lease, num_stages=1)
    write_folder(work / "stage-0" / "checkpoint-00000002", {"kind": "resume", "stage_index": 0, "step": 2,
                                                            "total_steps": 6, "metrics": {"eval_loss": 1.5}})
    write_folder(work / "stage-0" / "checkpoint-00000004", None)  # renamed without manifest: never happens
    write_folder(work / "stage-0" / "checkpoint-00000006.tmp",
                 {"kind": "resume", "stage_index": 0, "step": 6})
    write_folder(work / "export" / "adapter", {"kind": "adapter", "stage_index": 0, "step": 6})
    with sessions() as session:  # registered earlier, then deleted by retention before it was recorded
        session.add(Checkpoint(id=new_id("ckpt"), run_id=run_id, team_id="team_f", stage_index=0, step=1,
                               kind="resume", blob_prefix=f"runs/{run_id}/work/stage-0/checkpoint-00000001"))
        session.commit()

    registered = reporter.register_unrecorded_checkpoints(work)
    assert len(registered) == 2
    assert reporter.register_unrecorded_checkpoints(work) == []  # idempotent
    with sessions() as session:
        live = session.scalars(select(Checkpoint).where(Checkpoint.run_id == run_id,
                                                        Checkpoint.deleted_at.is_(None))).all()
        by_kind = {c.kind: c for c in live}
        assert set(by_kind) == {"resume", "adapter"} and len(live) == 2
        resume = by_kind["resume"]
        assert (resume.step, resume.metrics, resume.size_bytes) == (2, {"eval_loss": 1.5}, 10)
        assert resume.is_best
        assert resume.blob_prefix == f"runs/{run_id}/work/stage-0/checkpoint-00000002"
        assert resume.files == [{"path": "weights.bin", "size": 10, "sha256": "ab" * 32}]
        recovered = session.scalars(select(Event).where(Event.run_id == run_id,
                                                        Event.kind == "checkpoints_recovered")).all()
        assert len(recovered) == 1 and sorted(recovered[0].data["checkpoint_ids"]) == sorted(registered)


def test_event_text_numbers_stages_from_one(sessions: sessionmaker, tmp_path: Path) -> None:  # noqa: F811
    run_id = new_run(sessions)
    with sessions() as session:
        claimed = claim_run(session, run_id, "w", utcnow())
    lease = Lease(sessions, RUN, run_id, claimed.attempt, heartbeat_seconds=60)
    reporter = DbReporter(sessions, tmp_path, claimed, "team_f", lease, num_stages=2)
    reporter.on_event("stage_started", "stage 0 (sft) started",
                      {"stage_index": 0, "method": "sft", "total_steps": 4})
    with sessions() as session:
        event = session.scalar(select(Event).where(Event.run_id == run_id, Event.kind == "stage_started"))
        assert event.message == "stage 1/2 (sft) started" and event.data["stage_index"] == 0
    finished = event_text("stage_finished", "x", {"stage_index": 1, "method": "dpo"}, 2)
    assert finished == "stage 2/2 (dpo) finished"
    assert event_text("resumed", "x", {"stage_index": 0, "step": 3}, 2) == "resumed from stage 1/2 step 3"
    assert event_text("warning", "tracker off", {"tracker": "mlflow"}, 2) == "tracker off"


def test_the_reporter_keeps_step_and_speed_on_the_stage_row(sessions: sessionmaker, tmp_path: Path,  # noqa: F811
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    run_id = new_run(sessions)
    with sessions() as session:
        claimed = claim_run(session, run_id, "w", utcnow())
    lease = Lease(sessions, RUN, run_id, claimed.attempt, heartbeat_seconds=60)
    reporter = DbReporter(sessions, tmp_path, claimed, "team_f", lease, flush_rows=1000, flush_seconds=1000)
    start = utcnow()
    for step in range(1, 6):  # a step every 2 s; an eval point does not count
        monkeypatch.setattr("worker.reporter.utcnow", lambda step=step: start + timedelta(seconds=2 * step))
        reporter.on_metrics(0, step, "train", {"loss": 1.0})
    reporter.on_metrics(0, 5, "eval", {"loss": 1.0})
    reporter.flush()
    with sessions() as session:
        session.execute(update(RunStage).where(RunStage.run_id == run_id).values(total_steps=15))
        session.commit()
        run = session.get(Run, run_id)
        stage = run.stages[0]
        assert (stage.step, stage.seconds_per_step) == (5, 2.0)
        assert run_progress(run).eta_seconds == 2.0 * (15 - 5)
