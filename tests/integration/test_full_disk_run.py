"""A run whose storage fills up fails once, with a clear error, and leaves no half-written folder.

The storage volume is a real 160 KiB tmpfs (tests/small_disk.py): the dataset fits, a checkpoint
does not. The worker's `execute_run` trains the tiny model on it for real (SQLite, filesystem
broker); before issue 13 the write failed with an opaque torch error, the run was retried as a
system error and a `checkpoint-*.tmp` folder stayed on the full disk.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.e2e.service import service_env
from tests.small_disk import run_on_small_disk

_RUN_ON_FULL_DISK = """
import json
from app.broker import create_celery
from app.db.migrate import migrate
from sqlalchemy import select
from app.db.models import Dataset, Event, Run, RunStage, Team
from app.db.session import make_session_factory
from app.ids import new_id
from app.settings import Settings
from app.storage import LocalBlobStore
from worker.runs import execute_run

settings = Settings()
migrate(settings.database_url)
sessions = make_session_factory(settings)
store = LocalBlobStore(settings.storage_dir)
body = b''.join(json.dumps({"prompt": f"{i}+{i}=", "completion": str(2 * i)}).encode() + b"\\n"
                for i in range(16))
dataset_id = new_id("ds")
size, sha = store.write_bytes(f"datasets/{dataset_id}.jsonl", body)
spec = {"base_model": "tiny-llama", "seed": 1, "checkpoint_every_steps": 1, "export": ["adapter"],
        "adapter": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "stages": [{"method": "sft", "datasets": [{"id": dataset_id}], "max_steps": 3, "batch_size": 4,
                    "max_seq_len": 32}]}
with sessions() as session:
    session.add(Team(id="team_t", name="full-disk"))
    session.flush()
    session.add(Dataset(id=dataset_id, team_id="team_t", name="sft", format="sft", status="ready",
                        num_records=16, size_bytes=size, sha256=sha, blob_key=f"datasets/{dataset_id}.jsonl"))
    run = Run(id=new_id("run"), team_id="team_t", base_model="tiny-llama", spec=spec, max_attempts=3,
              stages=[RunStage(index=0, method="sft")])
    session.add(run)
    session.commit()
celery = create_celery(settings)
outcome = execute_run(run.id, settings=settings, sessions=sessions, store=store, celery=celery)
with sessions() as session:
    row = session.get(Run, run.id)
    result = {"outcome": outcome, "status": row.status, "attempt": row.attempt, "error": row.error}
result["tmp"] = [str(p) for p in settings.storage_dir.rglob("*.tmp") if p.name != ".tmp"] + [
    str(p) for p in (settings.storage_dir / ".tmp").iterdir()]
result["events"] = [e.message for e in sessions().scalars(select(Event).where(Event.run_id == run.id))]
print(json.dumps(result))
"""


def test_run_on_a_full_disk_fails_once_with_a_clear_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_model_dir, data / "models" / "tiny-llama")
    storage = tmp_path / "small-volume"
    env = service_env(data, TUNEYARD_STORAGE_DIR=str(storage), TUNEYARD_HEARTBEAT_SECONDS="0.5")
    out = run_on_small_disk(_RUN_ON_FULL_DISK, storage, 160 * 1024, env)
    assert out["outcome"] == "failed" and out["status"] == "failed", out
    assert out["attempt"] == 1  # failed once: not re-queued as a system error
    assert out["error"]["code"] == "storage_full" and "storage volume filled up" in out["error"]["message"]
    assert out["tmp"] == []
