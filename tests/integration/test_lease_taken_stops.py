"""A worker whose lease another attempt took stops its own work within the step it is in
(issue 13, item 5): before, the loop looked at the lease only when a step ended, and a GRPO step
with 10^9 completions ran on for minutes next to the new attempt.

The worker's `execute_run` trains the tiny model for real (SQLite, filesystem broker) on a step of
1,024 micro-batches; another owner claims the run meanwhile (its lease looks expired to the thief);
the first attempt must notice through its heartbeat and return `superseded` long before its step
could have ended.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from app.broker import create_celery
from app.db.models import Event, Metric, Run, RunStage, Team, utcnow
from app.ids import new_id
from app.jobs.lease import claim
from app.jobs.states import RUN
from app.settings import Settings
from tests.integration.conftest import SFT_RECORDS, embedded_services, stored_dataset
from worker.runs import execute_run


def test_a_worker_whose_lease_was_taken_stops_inside_its_step(tmp_path: Path, tiny_model_dir: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", env="test", heartbeat_seconds=0.3, lease_seconds=60)
    sessions, store = embedded_services(settings, tiny_model_dir)
    with sessions() as session:
        session.add(Team(id="team_t", name="lease"))
        session.flush()
        dataset_id = stored_dataset(session, store, "team_t", SFT_RECORDS, "sft")
        spec = {"base_model": "tiny-llama", "seed": 1, "export": ["adapter"],
                "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                "stages": [{"method": "sft", "datasets": [{"id": dataset_id}], "max_steps": 2,
                            "batch_size": 1, "gradient_accumulation": 1024, "max_seq_len": 64}]}
        run = Run(id=new_id("run"), team_id="team_t", base_model="tiny-llama", spec=spec,
                  stages=[RunStage(index=0, method="sft")])
        session.add(run)
        session.commit()
    outcome: list[str] = []
    worker = threading.Thread(target=lambda: outcome.append(execute_run(
        run.id, settings=settings, sessions=sessions, store=store, celery=create_celery(settings))))
    worker.start()

    def stage_started() -> bool:
        with sessions() as session:
            return session.scalar(select(Event.id).where(Event.run_id == run.id,
                                                         Event.kind == "stage_started")) is not None

    deadline = time.monotonic() + 120
    while not stage_started():
        assert time.monotonic() < deadline and worker.is_alive(), "the run never started training"
        time.sleep(0.2)
    time.sleep(1.0)  # inside the first step's micro-batches now
    with sessions() as session:  # another worker takes the run: to it, the lease has long expired
        thief = claim(session, RUN, run.id, "thief", utcnow() + timedelta(hours=1), lease_seconds=60,
                      max_attempts=3)
    assert thief is not None and thief.attempt == 2
    taken = time.monotonic()
    worker.join(timeout=60)
    assert not worker.is_alive() and outcome == ["superseded"]
    assert time.monotonic() - taken < 20
    with sessions() as session:  # the first attempt wrote no step after it lost the lease
        assert session.scalars(select(Metric).where(Metric.run_id == run.id)).first() is None
        assert session.get(Run, run.id).attempt == 2
    sessions.kw["bind"].dispose()
