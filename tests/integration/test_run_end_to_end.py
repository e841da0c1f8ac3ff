"""An SFT → DPO run through the HTTP API on PostgreSQL + Redis with a real worker subprocess:
live metrics on the SSE stream, checkpoints registered and downloadable (Range, tar), the adapter
giving the worker's final weights' logits in a fresh process, and Last-Event-ID replay."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
import threading
from pathlib import Path
from typing import Any

import torch

from tests.integration.conftest import (
    PREFERENCE_RECORDS,
    REPO,
    SFT_RECORDS,
    Stack,
    read_stream,
    upload,
    wait_status,
)


def _download_archive(client: Any, checkpoint_id: str, into: Path) -> Path:
    with client.stream("GET", f"/v1/checkpoints/{checkpoint_id}/archive") as response:
        assert response.status_code == 200
        data = b"".join(response.iter_bytes())
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into / checkpoint_id


def _probe(*args: str | Path) -> torch.Tensor:
    out = Path(args[2]).parent / f"logits-{args[0]}.json"
    subprocess.run([sys.executable, "-m", "tests.integration.probe_logits", str(args[0]), str(args[1]),
                    str(args[2]), str(out), *map(str, args[3:])], cwd=REPO, check=True, timeout=120)
    return torch.tensor(json.loads(out.read_text()))


def test_sft_then_dpo_end_to_end(stack: Stack, tmp_path: Path) -> None:
    stack.start_worker()
    client = stack.client()
    sft_id = upload(client, SFT_RECORDS, "sft")
    pref_id = upload(client, PREFERENCE_RECORDS, "preference")
    spec = {"name": "sft-dpo", "base_model": "tiny-llama", "seed": 5,
            "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "stages": [{"method": "sft", "datasets": [{"id": sft_id}], "max_steps": 8, "batch_size": 4,
                        "max_seq_len": 64, "learning_rate": 1e-3},
                       {"method": "dpo", "datasets": [{"id": pref_id}], "max_steps": 4, "batch_size": 4,
                        "max_seq_len": 64, "learning_rate": 1e-3}],
            "checkpoint_every_steps": 2, "keep_checkpoints": 2, "export": ["adapter", "merged"]}
    response = client.post("/v1/runs", json=spec)
    assert response.status_code == 201, response.text
    run_id = response.json()["id"]

    messages: list[dict[str, Any]] = []
    reader = threading.Thread(target=read_stream, args=(stack.client(), run_id, messages), daemon=True)
    reader.start()
    run = wait_status(client, run_id, {"succeeded", "failed", "cancelled"})
    reader.join(30)
    assert run["status"] == "succeeded", (run, client.get(f"/v1/runs/{run_id}/events").json())
    assert [(s["status"], s["step"], s["total_steps"]) for s in run["stages"]] == [
        ("succeeded", 8, 8), ("succeeded", 4, 4)]
    assert run["progress"]["fraction"] == 1.0 and run["attempt"] == 1

    # Metrics arrived on the stream while the run was running, before its final status.
    assert not reader.is_alive(), "the stream ends after the terminal status"
    final = next(i for i, m in enumerate(messages) if m["event"] == "status"
                 and m["data"]["status"] == "succeeded")
    live_metrics = [m for m in messages[:final] if m["event"] == "metrics"]
    running = [m for m in messages if m["event"] == "status" and m["data"]["status"] == "running"]
    assert running and live_metrics and live_metrics[0]["at"] < messages[final]["at"]
    streamed = sorted((m["data"]["stage_index"], m["data"]["step"]) for m in live_metrics
                      if m["data"]["split"] == "train")
    assert streamed == [(0, s) for s in range(1, 9)] + [(1, s) for s in range(1, 5)]
    dpo_point = next(m for m in live_metrics if m["data"]["stage_index"] == 1)
    assert "rewards/accuracies" in dpo_point["data"]["values"]

    # Reconnecting with Last-Event-ID replays exactly the rows sent after that message — none
    # twice, none missing (metrics and events may interleave differently than they did live).
    cut = len(messages) // 2
    replay: list[dict[str, Any]] = []
    read_stream(stack.client(), run_id, replay, last_event_id=messages[cut]["id"])
    later = sorted((m["event"], m["data"]["id"]) for m in messages[cut + 1:] if m["event"] != "status")
    replayed = [(m["event"], m["data"]["id"]) for m in replay if m["event"] != "status"]
    assert len(replayed) == len(set(replayed)) and sorted(replayed) == later and later

    # Checkpoints: resume ones kept by retention (keep 2 per stage), then the two exports.
    listed = client.get(f"/v1/runs/{run_id}/checkpoints").json()["data"]
    resume = [(c["stage_index"], c["step"]) for c in listed if c["kind"] == "resume"]
    assert resume == [(0, 6), (0, 8), (1, 2), (1, 4)]
    exports = {c["kind"]: c for c in listed if c["kind"] != "resume"}
    assert set(exports) == {"adapter", "merged"}
    model_ids = {m["id"]: m["kind"] for m in client.get("/v1/models").json()["data"]}
    assert model_ids[exports["adapter"]["id"]] == "adapter" and model_ids["tiny-llama"] == "base"

    # Per-file download with Range, resumed from the middle; sizes and sha256 match the listing.
    adapter = client.get(f"/v1/checkpoints/{exports['adapter']['id']}").json()
    weights = next(f for f in adapter["files"] if f["path"].endswith(".safetensors"))
    url = f"/v1/checkpoints/{adapter['id']}/files/{weights['path']}"
    head = client.get(url, headers={"Range": "bytes=0-99"})
    assert head.status_code == 206 and len(head.content) == 100
    rest = client.get(url, headers={"Range": "bytes=100-"})
    assert rest.status_code == 206
    assert hashlib.sha256(head.content + rest.content).hexdigest() == weights["sha256"]
    assert client.get(f"/v1/checkpoints/{adapter['id']}/files/..%2Fmanifest.json").status_code == 404

    # The adapter, downloaded as a tar and loaded with peft in a fresh process, gives the logits
    # of the worker's final weights: the last stage's final resume checkpoint (also downloaded),
    # which the training loop wrote from the tensors it held after its last optimizer step.
    adapter_dir = _download_archive(client, adapter["id"], tmp_path / "adapter")
    final_ckpt = next(c for c in listed if c["kind"] == "resume" and (c["stage_index"], c["step"]) == (1, 4))
    ckpt_dir = _download_archive(client, final_ckpt["id"], tmp_path / "final")
    base = stack.settings.base_models_dir / "tiny-llama"
    from_adapter = _probe("adapter", base, adapter_dir)
    from_checkpoint = _probe("checkpoint", base, ckpt_dir, 4, 8)
    from_base = _probe("base", base, tmp_path / "base")
    assert from_adapter.shape == from_checkpoint.shape == from_base.shape
    assert (from_adapter - from_base).abs().max() > 1e-3, "training changed the model"
    difference = (from_adapter - from_checkpoint).abs().max()
    assert torch.allclose(from_adapter, from_checkpoint, atol=1e-5), difference
