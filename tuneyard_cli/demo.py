"""`tuneyard up --demo`: upload a small SFT dataset to a starting server and submit a short run."""

from __future__ import annotations

import json
import sys
import time

import httpx

from tuneyard_cli.http import checked, client

DEMO_RECORDS = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                              {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
                for a in range(1, 9) for b in range(1, 5)]


def _healthy(api: httpx.Client) -> bool:
    """Returns whether the API answers /healthz (a refused connection means: not up yet)."""
    try:
        return api.get("/healthz").status_code == 200
    except httpx.TransportError:
        return False


def run_demo(url: str, key: str | None, base_model: str, wait_seconds: float = 120) -> str | None:
    """Returns the id of a short demo SFT run submitted to a starting server (None if it is not up)."""
    api = client(url, key)
    deadline = time.monotonic() + wait_seconds
    while not _healthy(api):
        if time.monotonic() > deadline:
            print("demo: the API did not come up; no demo run submitted", file=sys.stderr)
            return None
        time.sleep(0.5)
    body = "".join(json.dumps(r) + "\n" for r in DEMO_RECORDS).encode()
    dataset = checked(api.post("/v1/datasets", content=body, headers={"Content-Type": "application/jsonl"},
                           params={"format": "sft", "name": "demo-arithmetic"}))
    while dataset["status"] == "validating":
        time.sleep(0.5)
        dataset = checked(api.get(f"/v1/datasets/{dataset['id']}"))
    spec = {"name": "demo-sft", "base_model": base_model,
            "adapter": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
            "stages": [{"method": "sft", "datasets": [{"id": dataset["id"]}], "max_steps": 30,
                        "batch_size": 4, "max_seq_len": 64, "learning_rate": 1e-3}],
            "checkpoint_every_steps": 10, "keep_checkpoints": 2, "export": ["adapter"]}
    run = checked(api.post("/v1/runs", json=spec))
    print(f"demo run {run['id']} submitted (SFT, 30 steps on {base_model})")
    return run["id"]
