"""Helpers for the inference and eval tests: a tiny base model installed as `tiny-llama`, a LoRA
fine-tuned on a small greeting task with the real training pipeline, and its exports registered as
checkpoints of a finished run (database rows + folders in the blob store)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app.db.models import Checkpoint, Run, RunStage, Team, utcnow
from app.ids import new_id
from app.settings import Settings
from app.storage import LocalBlobStore

BASE_MODEL = "tiny-llama"
RUN_NAME = "greeter"
TRAIN_STEPS = 40
_WORDS = "the a what is how why tool search city file read write list count find compute data model".split()
ANSWERS = {"hello": "hello there", "thanks": "you are welcome"}


def greeting_records(count: int, seed: int) -> list[dict[str, Any]]:
    """Returns sft chat records: a few filler words then "hello" or "thanks", answered by a fixed phrase."""
    rng = random.Random(seed)
    records = []
    for i in range(count):
        keyword = ("hello", "thanks")[i % 2]
        words = " ".join(rng.choice(_WORDS) for _ in range(4))
        records.append(
            {
                "messages": [
                    {"role": "user", "content": f"{words} {keyword}"},
                    {"role": "assistant", "content": ANSWERS[keyword]},
                ]
            }
        )
    return records


def jsonl(records: list[dict[str, Any]]) -> bytes:
    return "\n".join(json.dumps(r) for r in records).encode() + b"\n"


def run_spec() -> dict[str, Any]:
    return {
        "name": RUN_NAME,
        "base_model": BASE_MODEL,
        "seed": 0,
        "adapter": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "stages": [
            {
                "method": "sft",
                "datasets": [{"id": "ds_train"}],
                "max_steps": TRAIN_STEPS,
                "batch_size": 8,
                "learning_rate": 0.01,
                "lr_scheduler": "constant",
                "packing": False,
            }
        ],
        "checkpoint_every_steps": None,
        "export": ["adapter", "merged"],
    }


def finetuned_exports(tiny_model_dir: Path, cache_dir: Path) -> dict[str, Path]:
    """Returns {"adapter", "merged"} export folders of the greeting fine-tune (trained once per cache_dir)."""
    done = cache_dir / "done.json"
    if done.exists():
        return {kind: Path(path) for kind, path in json.loads(done.read_text()).items()}
    from trainer_core.config import RunSpec
    from trainer_core.pipeline import run_pipeline
    from trainer_core.reporting import RecordingReporter

    cache_dir.mkdir(parents=True, exist_ok=True)
    train = cache_dir / "train.jsonl"
    train.write_bytes(jsonl(greeting_records(64, seed=0)))
    result = run_pipeline(
        RunSpec.model_validate(run_spec()),
        base_model_path=tiny_model_dir,
        dataset_paths={"ds_train": train},
        dataset_formats={"ds_train": "sft"},
        work_dir=cache_dir / "work",
        reporter=RecordingReporter(),
        device="cpu",
    )
    assert result.status == "succeeded", result
    done.write_text(json.dumps({kind: str(path) for kind, path in result.exports.items()}))
    return dict(result.exports)


def install_base_model(settings: Settings, tiny_model_dir: Path) -> Path:
    """Returns the `tiny-llama` folder under the settings' base models, copied from the tiny model."""
    target = settings.base_models_dir / BASE_MODEL
    if not (target / "config.json").exists():
        shutil.copytree(tiny_model_dir, target, dirs_exist_ok=True)
    return target


def register_finetune(
    session: Session, store: LocalBlobStore, team: Team, exports: dict[str, Path], name: str = RUN_NAME
) -> dict[str, str]:
    """Returns {kind: checkpoint id} after recording a succeeded run with the exports as its checkpoints."""
    now = utcnow()
    run = Run(
        id=new_id("run"),
        team_id=team.id,
        name=name,
        status="succeeded",
        base_model=BASE_MODEL,
        spec=run_spec() | {"name": name},
        attempt=1,
        started_at=now,
        finished_at=now,
    )
    run.stages = [
        RunStage(index=0, method="sft", status="succeeded", step=TRAIN_STEPS, total_steps=TRAIN_STEPS)
    ]
    session.add(run)
    session.flush()  # the checkpoints' foreign key needs the run row first
    ids: dict[str, str] = {}
    for kind, folder in exports.items():
        checkpoint_id = new_id("ckpt")
        prefix = f"checkpoints/{team.id}/{run.id}/{checkpoint_id}"
        shutil.copytree(folder, store.path_for(prefix))
        session.add(
            Checkpoint(
                id=checkpoint_id,
                run_id=run.id,
                team_id=team.id,
                stage_index=0,
                step=TRAIN_STEPS,
                kind=kind,
                blob_prefix=prefix,
            )
        )
        ids[kind] = checkpoint_id
    session.commit()
    return ids
