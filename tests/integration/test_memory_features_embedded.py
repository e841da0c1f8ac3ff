"""Through the HTTP API on the embedded default (`tuneyard up`: SQLite, filesystem broker, one worker):
a QLoRA SFT run and a gradient-checkpointed SFT run both succeed and export what they promise."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import REPO, SFT_RECORDS, free_port, upload, wait_for, wait_status

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                reason="bitsandbytes is not installed")


def _spec(dataset_id: str, **extra: object) -> dict:
    return {"base_model": "tiny-llama", "seed": 3, "checkpoint_every_steps": 2,
            "export": ["adapter", "merged"],
            "stages": [{"method": "sft", "datasets": [{"id": dataset_id}], "max_steps": 3, "batch_size": 4,
                        "max_seq_len": 64, "learning_rate": 1e-3}], **extra}


def test_qlora_and_checkpointed_sft_runs_succeed_on_the_embedded_default(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEYARD_")}
    # Default lease timings: two runs loading models at once on a small shared machine can hold a
    # heartbeat back longer than the integration suite's 3 s lease.
    env.update(TUNEYARD_DATA_DIR=str(tmp_path / "data"), TUNEYARD_ENV="test",
               PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    log = tmp_path / "up.log"
    up = subprocess.Popen([sys.executable, "-m", "tuneyard_cli", "up", "--port", str(port)], cwd=REPO,
                          env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        printed = re.compile(r"\nAPI key .*\n  (ty_\S+)\n")
        found = wait_for(lambda: printed.search(log.read_text()), 240, "the banner with the key", every=0.5)
        key = found.group(1)
        api = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"},
                           timeout=30)
        wait_for(lambda: _ok(api), 120, "the API to answer")
        dataset = upload(api, SFT_RECORDS, "sft", timeout=120)

        qlora = api.post("/v1/runs", json=_spec(dataset, adapter={
            "type": "qlora", "r": 4, "alpha": 8, "dropout": 0.0, "quant_type": "nf4", "double_quant": True}))
        checkpointed = api.post("/v1/runs", json=_spec(dataset, gradient_checkpointing=True))
        assert qlora.status_code == 201, qlora.text
        assert checkpointed.status_code == 201, checkpointed.text
        for run_id in (qlora.json()["id"], checkpointed.json()["id"]):
            run = wait_status(api, run_id, {"succeeded", "failed", "cancelled"}, timeout=600)
            assert run["status"] == "succeeded", (run["error"], events_of(api, run_id))
            assert run["stages"][0]["step"] == 3
            kinds = {c["kind"] for c in api.get(f"/v1/runs/{run_id}/checkpoints").json()["data"]}
            assert {"adapter", "merged"} <= kinds
        started = [e for e in api.get(f"/v1/runs/{checkpointed.json()['id']}/events").json()["data"]
                   if e["kind"] == "stage_started"]
        assert started and started[0]["data"]["gradient_checkpointing"] is True
        assert qlora.json()["spec"]["adapter"]["type"] == "qlora"
    finally:
        os.killpg(up.pid, signal.SIGTERM)
        try:
            up.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait(10)


def events_of(api: httpx.Client, run_id: str) -> list[str]:
    return [e["message"] for e in api.get(f"/v1/runs/{run_id}/events").json()["data"]]


def _ok(api: httpx.Client) -> bool:
    try:
        return api.get("/healthz").status_code == 200
    except httpx.TransportError:
        return False
