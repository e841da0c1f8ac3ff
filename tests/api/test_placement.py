"""Fit at submit: the estimate shown on the run, 422 does_not_fit with the numbers, the warning when no
worker registered, and the reason a queued run waits."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.db.models import WorkerHost, utcnow
from app.jobs.placement import claimable_here
from tests.api.conftest import Backend, upload_jsonl, wait_for_dataset, write_model_folder

GIB = 2**30
LLAMA_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8}


@pytest.fixture
def model_8b(backend: Backend) -> str:
    folder = backend.settings.base_models_dir / "llama-8b-shape"
    if not folder.exists():
        # A loadable-looking folder (weights header, tokenizer) whose config has an 8B model's sizes.
        write_model_folder(folder)
        (folder / "config.json").write_text(json.dumps(LLAMA_8B))
    return "llama-8b-shape"


def _only_workers(backend: Backend, *memories_gib: int) -> None:
    """Leaves exactly these live workers (one 24 GB-class GPU each), all earlier ones gone stale."""
    with backend.app.state.sessions() as session:
        session.execute(update(WorkerHost).values(heartbeat_at=utcnow() - timedelta(hours=1)))
        for i, memory in enumerate(memories_gib):
            session.add(WorkerHost(id=f"gpu-{memory}-{i}-{utcnow().timestamp()}", device_kind="cuda",
                                   device_count=1, memory_per_device_bytes=memory * GIB,
                                   device_name="NVIDIA L4"))
        session.commit()


def _spec(dataset: str, model: str, adapter: dict, max_seq_len: int = 2048) -> dict:
    return {"base_model": model, "adapter": adapter, "export": ["merged"] if adapter["type"] == "full" else
            ["adapter"], "stages": [{"method": "sft", "datasets": [{"id": dataset}], "max_steps": 5,
                                     "batch_size": 1, "max_seq_len": max_seq_len}]}


@pytest.fixture
def dataset(client: TestClient, auth: dict) -> str:
    dataset_id = upload_jsonl(client, auth, b'{"prompt": "2+2=", "completion": "4"}\n' * 4)["id"]
    assert wait_for_dataset(client, auth, dataset_id)["status"] == "ready"
    return dataset_id


def test_full_finetune_of_8b_on_24gb_workers_is_refused_with_numbers(
        backend: Backend, client: TestClient, auth: dict, dataset: str, model_8b: str) -> None:
    _only_workers(backend, 24, 24)
    response = client.post("/v1/runs", json=_spec(dataset, model_8b, {"type": "full"}), headers=auth)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "does_not_fit" and error["param"] == "resources"
    assert "24.0 GiB" in error["message"] and "1 device(s)" in error["message"]
    assert "L4" in error["message"]

    fits = client.post("/v1/runs", json=_spec(dataset, model_8b, {"type": "lora", "r": 8}, 512), headers=auth)
    assert fits.status_code == 201, fits.text
    estimate = fits.json()["estimate"]
    assert 0 < estimate["peak_memory_bytes_per_device"] < 24 * GIB * 0.9
    assert estimate["tokens_per_step"] == 512 and estimate["step_seconds"] > 0
    assert estimate["stages"][0]["memory"]["weights"] > 15 * GIB  # 8B bf16 weights
    assert fits.json()["waiting_reason"] is None


def test_no_registered_worker_accepts_with_a_warning_and_says_why_it_waits(
        backend: Backend, client: TestClient, auth: dict, dataset: str, model_8b: str) -> None:
    _only_workers(backend)
    created = client.post("/v1/runs", json=_spec(dataset, model_8b, {"type": "full"}), headers=auth)
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    log = client.get(f"/v1/runs/{run_id}/events", headers=auth).json()["data"]
    assert [e["kind"] for e in log] == ["queued", "fit_unchecked"]
    assert "no worker is running" in client.get(f"/v1/runs/{run_id}", headers=auth).json()["waiting_reason"]

    _only_workers(backend, 24)
    # GET answers from a snapshot up to its ttl old.
    deadline = time.monotonic() + 10
    while (reason := client.get(f"/v1/runs/{run_id}", headers=auth).json()["waiting_reason"]).startswith(
            "no worker is running") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert reason.startswith("no live worker can hold the run") and "24.0 GiB" in reason


def test_a_worker_that_cannot_hold_a_run_leaves_it_queued_and_says_why_once(
        backend: Backend, client: TestClient, auth: dict, dataset: str, model_8b: str) -> None:
    _only_workers(backend, 80)
    run_id = client.post("/v1/runs", json=_spec(dataset, model_8b, {"type": "lora", "r": 8}, 2048),
                         headers=auth).json()["id"]
    small = WorkerHost(id="small-gpu", device_kind="cuda", device_count=1, memory_per_device_bytes=8 * GIB,
                       device_name="NVIDIA T4")
    big = WorkerHost(id="big-gpu", device_kind="cuda", device_count=1, memory_per_device_bytes=80 * GIB,
                     device_name="NVIDIA H100")
    with backend.app.state.sessions() as session:
        assert not claimable_here(session, run_id, small)
        assert not claimable_here(session, run_id, small)
        assert claimable_here(session, run_id, big)
    log = client.get(f"/v1/runs/{run_id}/events", headers=auth).json()["data"]
    waiting = [e for e in log if e["kind"] == "waiting_for_capacity"]
    assert len(waiting) == 1 and "small-gpu" in waiting[0]["message"] and "8.0 GiB" in waiting[0]["message"]
    assert client.get(f"/v1/runs/{run_id}", headers=auth).json()["status"] == "queued"
