"""A finished adapter checkpoint wherever a model is named, through the API on the production-shaped
stack: as `base_model` (its adapter loaded over its base and trained further), as a SAD teacher,
and served for chat; a combination that cannot work is a 422 at submit, never a failed run."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from tests.integration.conftest import SFT_RECORDS, Stack, sft_spec, upload, wait_status

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TRAJECTORIES = [json.loads(line) for line in (EXAMPLES / "trajectories.jsonl").read_text().splitlines()]


def _export(client, run_id: str, kind: str) -> dict:  # noqa: ANN001 - httpx.Client
    checkpoints = client.get(f"/v1/runs/{run_id}/checkpoints").json()["data"]
    return next(c for c in checkpoints if c["kind"] == kind)


def _adapter_weights(folder: Path) -> dict:
    return load_file(folder / "adapter_model.safetensors")


def test_an_adapter_checkpoint_trains_further_teaches_and_serves(stack: Stack) -> None:
    stack.start_worker()
    client = stack.client()
    sft = upload(client, SFT_RECORDS, "sft")
    trajectories = upload(client, TRAJECTORIES, "trajectories")
    parent = client.post("/v1/runs", json=sft_spec(sft, 3, every=3)).json()
    assert wait_status(client, parent["id"], {"succeeded", "failed"})["status"] == "succeeded"
    adapter = _export(client, parent["id"], "adapter")["id"]

    # Impossible: full fine-tuning cannot continue a LoRA adapter — refused at submit.
    full = client.post("/v1/runs", json={**sft_spec(sft, 2), "base_model": adapter,
                                         "adapter": {"type": "full"}, "export": ["merged"]})
    assert full.status_code == 422 and full.json()["error"]["param"] == "adapter.type", full.text

    child_spec = {**sft_spec(sft, 2, every=2), "base_model": adapter, "export": ["adapter", "merged"]}
    del child_spec["adapter"]  # continues the parent's adapter (r=4), not a fresh default r=16
    child = client.post("/v1/runs", json=child_spec)
    assert child.status_code == 201, child.text
    child = child.json()
    assert child["spec"]["adapter"]["r"] == 4
    distil = {"name": "sad-from-adapter", "base_model": "tiny-llama", "seed": 1,
              "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
              "stages": [{"method": "sad", "datasets": [{"id": trajectories}], "max_steps": 2,
                          "batch_size": 4, "max_seq_len": 96, "learning_rate": 1e-3,
                          "divergence": "forward_kl",
                          "teacher": {"source": "model", "model": adapter, "top_k": 8}}],
              "checkpoint_every_steps": 2}
    sad = client.post("/v1/runs", json=distil)
    assert sad.status_code == 201, sad.text

    assert wait_status(client, child["id"], {"succeeded", "failed"})["status"] == "succeeded"
    storage = stack.settings.storage_dir
    parent_weights = _adapter_weights(storage / "runs" / parent["id"] / "work" / "export" / "adapter")
    start = _adapter_weights(storage / "runs" / child["id"] / "work" / "stage-0" / "start")
    trained = _adapter_weights(storage / "runs" / child["id"] / "work" / "export" / "adapter")
    # The child began exactly at the parent's adapter, and trained it further.
    assert start.keys() == parent_weights.keys()
    assert all(start[k].equal(parent_weights[k]) for k in start)
    assert any(not trained[k].equal(start[k]) for k in start)

    sad_run = wait_status(client, sad.json()["id"], {"succeeded", "failed"})
    assert sad_run["status"] == "succeeded", sad_run["error"]
    metrics = client.get(f"/v1/runs/{sad_run['id']}/metrics", params={"names": "loss"}).json()["data"]
    assert metrics and metrics[0]["points"]

    # The continued adapter applies to tiny-llama (its parent's base) when served; the first request
    # loads torch and the model into the API process, hence the long timeout.
    reply = client.post("/v1/chat/completions", timeout=120, json={
        "model": _export(client, child["id"], "adapter")["id"], "max_tokens": 3, "temperature": 0,
        "messages": [{"role": "user", "content": "What is 1 plus 1?"}]})
    assert reply.status_code == 200, reply.text
