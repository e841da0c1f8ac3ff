"""Rows written straight into the service's database, as the worker would write them."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Checkpoint, Dataset, Eval, Event, Run, RunStage
from app.ids import new_id
from app.services.metrics import MetricPoint, upsert_metrics

SFT_SPEC = {
    "name": "seeded",
    "base_model": "tiny-llama",
    "stages": [{"method": "sft", "datasets": [{"id": "ds_seeded"}], "max_steps": 200}],
}


def seed_running_run(sessions: sessionmaker[Session], team_id: str, name: str, total_steps: int = 200) -> str:
    """Returns the id of a new run that is `running` its only SFT stage at step 0."""
    now = datetime.now(UTC)
    run = Run(id=new_id("run"), team_id=team_id, name=name, status="running", base_model="tiny-llama",
              spec={**SFT_SPEC, "name": name}, attempt=1, started_at=now - timedelta(minutes=2),
              lease_owner="seed", heartbeat_at=now)
    run.stages = [RunStage(index=0, method="sft", status="running", step=0, total_steps=total_steps,
                           started_at=now - timedelta(minutes=2))]
    with sessions() as session:
        session.add(run)
        session.flush()
        session.add(Event(run_id=run.id, attempt=1, kind="stage_started", message="stage 1 (sft) started"))
        session.commit()
    return run.id


def train_loss(step: int, scale: float = 3.0) -> float:
    """Returns the seeded train loss at a step (a decaying curve; `scale` tells runs apart)."""
    return scale * math.exp(-step / 60) + 0.5


def add_train_steps(sessions: sessionmaker[Session], run_id: str, first: int, last: int,
                    scale: float = 3.0) -> None:
    """Writes train metric rows for steps first..last (a decaying loss) and moves the stage's step."""
    now = datetime.now(UTC)
    points = []
    for step in range(first, last + 1):
        points.append(MetricPoint(0, step, "train", {"loss": train_loss(step, scale), "lr": 2e-4,
                                                     "grad_norm": 1.0}, now))
        if step % 10 == 0:
            points.append(MetricPoint(0, step, "eval", {"loss": 3.2 * math.exp(-step / 70) + 0.6}, now))
    with sessions() as session:
        # Through the service's upsert, as the worker's reporter writes them (it keeps the series catalog).
        upsert_metrics(session, run_id, points)
        stage = session.get(RunStage, (run_id, 0))
        stage.step = last
        session.commit()


def seed_invalid_dataset(sessions: sessionmaker[Session], team_id: str) -> str:
    """Returns the id of an `invalid` SFT dataset with two validation errors."""
    dataset = Dataset(
        id=new_id("ds"), team_id=team_id, name="broken-chats.jsonl", format="sft", status="invalid",
        num_records=41, size_bytes=18_432, sha256="0" * 64, blob_key="datasets/none", stats={"records": 41},
        errors=[{"line": 7, "field": "messages[1].role", "message": "role must be user, assistant or system"},
                {"line": 19, "field": "messages", "message": "a conversation needs an assistant turn"}],
    )
    with sessions() as session:
        session.add(dataset)
        session.commit()
    return dataset.id


def seed_ready_dataset(sessions: sessionmaker[Session], team_id: str) -> str:
    """Returns the id of a `ready` SFT dataset (a row; its file is never read here)."""
    dataset = Dataset(id=new_id("ds"), team_id=team_id, name="ready-chats.jsonl", format="sft",
                      status="ready", num_records=12, size_bytes=2_048, sha256="1" * 64,
                      blob_key="datasets/none", stats={"records": 12}, errors=[])
    with sessions() as session:
        session.add(dataset)
        session.commit()
    return dataset.id


def seed_finished_eval(sessions: sessionmaker[Session], team_id: str, dataset_id: str) -> str:
    """Returns the id of a `succeeded` eval comparing the base model with a checkpoint."""
    results = {"base": (2.31, 0.1, "5"), "ckpt_seeded": (1.42, 0.6, "4")}
    row = Eval(
        id=new_id("eval"), team_id=team_id, status="succeeded", progress=1.0, finished_at=datetime.now(UTC),
        request={"name": "base-vs-sft", "models": ["base", "ckpt_seeded"], "dataset_id": dataset_id,
                 "metrics": ["loss", "exact_match"]},
        results={
            "table": [{"model": m, "loss": loss, "exact_match": em} for m, (loss, em, _) in results.items()],
            "models": [{"model": m, "metrics": {"loss": loss, "exact_match": em}, "num_examples": 20,
                        "samples": [{"prompt": "2+2=", "completion": answer}]}
                       for m, (loss, em, answer) in results.items()],
        },
    )
    with sessions() as session:
        session.add(row)
        session.commit()
    return row.id


def finish_run(sessions: sessionmaker[Session], run_id: str, status: str) -> None:
    """Ends a seeded run and its running stages with `status` (succeeded, failed or cancelled)."""
    with sessions() as session:
        run = session.get(Run, run_id)
        run.status = status
        run.finished_at = datetime.now(UTC)
        for stage in run.stages:
            if stage.status == "running":
                stage.status = status
                stage.finished_at = run.finished_at
        session.commit()


def seed_finished_run(sessions: sessionmaker[Session], team_id: str, name: str, *, learning_rate: float,
                      scale: float, steps: int = 30) -> str:
    """Returns the id of a `succeeded` one-stage SFT run with metrics, a resume checkpoint and exports."""
    run_id = seed_running_run(sessions, team_id, name, total_steps=steps)
    add_train_steps(sessions, run_id, 1, steps, scale)
    finish_run(sessions, run_id, "succeeded")
    with sessions() as session:
        run = session.get(Run, run_id)
        stage = {**run.spec["stages"][0], "learning_rate": learning_rate, "max_steps": steps}
        run.spec = {**run.spec, "stages": [stage]}
        files = [{"path": "adapter_model.safetensors", "size": 1_048_576, "sha256": "a" * 64},
                 {"path": "tokenizer/special_tokens_map.json", "size": 512, "sha256": "b" * 64}]
        for kind in ("resume", "adapter", "merged"):
            checkpoint_id = new_id("ckpt")
            session.add(Checkpoint(id=checkpoint_id, run_id=run_id, team_id=team_id, stage_index=0,
                                   step=steps, kind=kind, blob_prefix=f"checkpoints/{run_id}/{checkpoint_id}",
                                   files=files, metrics={"loss": train_loss(steps, scale), "eval_loss": 0.9,
                                            "mean_token_accuracy": 0.61},
                                   size_bytes=1_049_088))
        session.commit()
    return run_id
