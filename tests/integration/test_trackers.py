"""Experiment trackers for real, in their local modes: a short SFT run through the worker
(`execute_run`: claim, DbReporter, trackers, the real pipeline on the tiny model, SQLite) mirrors
its metrics to MLflow (local SQLite store in the run's work folder) and to W&B (offline mode);
both are read back and must hold exactly the values the database holds. An unreachable MLflow
server only switches MLflow off."""

from __future__ import annotations

import glob
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.broker import create_celery
from app.db.models import Event, Metric, Run, RunStage, Team
from app.ids import new_id
from app.settings import Settings
from app.storage import LocalBlobStore
from tests.integration.conftest import SFT_RECORDS, embedded_services, stored_dataset
from worker.runs import execute_run, work_dir_key

mlflow = pytest.importorskip("mlflow")
wandb_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2")

STEPS = 6


@dataclass
class Worker:
    settings: Settings
    sessions: sessionmaker[Session]
    store: LocalBlobStore
    dataset_id: str

    def run(self, integrations: dict[str, Any]) -> str:
        """Returns the id of a STEPS-step SFT run after the worker executed it to its end."""
        spec = {"name": "tracked", "base_model": "tiny-llama", "seed": 1, "checkpoint_every_steps": 3,
                "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0}, "export": ["adapter"],
                "stages": [{"method": "sft", "datasets": [{"id": self.dataset_id}], "max_steps": STEPS,
                            "batch_size": 4, "max_seq_len": 64, "learning_rate": 1e-3}],
                "integrations": integrations}
        with self.sessions() as session:
            run = Run(id=new_id("run"), team_id="team_t", base_model="tiny-llama", spec=spec,
                      stages=[RunStage(index=0, method="sft")])
            session.add(run)
            session.commit()
        outcome = execute_run(run.id, settings=self.settings, sessions=self.sessions, store=self.store,
                              celery=create_celery(self.settings))
        assert outcome == "succeeded", self.events(run.id)
        return run.id

    def train_losses(self, run_id: str) -> dict[int, float]:
        with self.sessions() as session:
            rows = session.scalars(select(Metric).where(Metric.run_id == run_id, Metric.split == "train"))
            return {row.step: row.values["loss"] for row in rows}

    def events(self, run_id: str) -> list[tuple[str, str]]:
        with self.sessions() as session:
            return [(e.kind, e.message) for e in session.scalars(select(Event).where(Event.run_id == run_id))]


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Worker]:
    root = tmp_path_factory.mktemp("trackers")
    settings = Settings(data_dir=root / "data", env="test", heartbeat_seconds=0.5)
    sessions, store = embedded_services(settings, tiny_model_dir)
    with sessions() as session:
        session.add(Team(id="team_t", name="trackers"))
        session.flush()
        dataset_id = stored_dataset(session, store, "team_t", SFT_RECORDS, "sft")
        session.commit()
    yield Worker(settings, sessions, store, dataset_id)
    sessions.kw["bind"].dispose()


def wandb_records(path: Path) -> Iterator[Any]:
    """Yields the protobuf records of a W&B offline run file (a LevelDB-style log after a 7-byte header)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, block = 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = wandb_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_metrics_mirrored_to_mlflow_and_wandb_match_the_database(
        worker: Worker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run_id = worker.run({"mlflow": {"experiment": "it"}, "wandb": {"project": "it", "mode": "offline"}})
    losses = worker.train_losses(run_id)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert not [e for e in worker.events(run_id) if e[0] == "warning"]
    work = worker.store.path_for(work_dir_key(run_id))

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("it")
    (found,) = client.search_runs([experiment.experiment_id], f"tags.tuneyard_run_id = '{run_id}'")
    assert found.info.status == "FINISHED" and found.info.run_name == "tracked"
    history = client.get_metric_history(found.info.run_id, "stage0/train/loss")
    assert {m.step: m.value for m in history} == losses
    assert experiment.artifact_location.startswith((work / "mlflow").as_uri())
    assert [a.path for a in client.list_artifacts(found.info.run_id)] == ["run_spec.json"]

    (run_file,) = glob.glob(str(work / "wandb" / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    logged: dict[int, float] = {}
    exit_codes = []
    for record in wandb_records(Path(run_file)):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                   for item in record.history.item}
            logged[row["stage0/step"]] = row["stage0/train/loss"]
        elif kind == "run":
            assert (record.run.run_id, record.run.project) == (run_id, "it")
        elif kind == "exit":
            exit_codes.append(record.exit.exit_code)
    assert logged == losses and exit_codes == [0]


def test_an_unreachable_mlflow_server_never_fails_the_run(
        worker: Worker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    run_id = worker.run({"mlflow": {"tracking_uri": "http://127.0.0.1:9"}})
    assert sorted(worker.train_losses(run_id)) == list(range(1, STEPS + 1))
    warnings = [message for kind, message in worker.events(run_id) if kind == "warning"]
    assert len(warnings) == 1 and warnings[0].startswith("mlflow tracker could not start")
