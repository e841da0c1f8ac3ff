"""A run on two ranks (torchrun, gloo on CPU) under a real worker: one rank SIGKILLed mid-run ends
the attempt, and the next attempt resumes from the last checkpoint with every step stored once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.integration.conftest import (
    SFT_RECORDS,
    Stack,
    events,
    sft_spec,
    train_steps,
    upload,
    wait_for,
    wait_status,
)

STEPS, EVERY = 60, 10
# A 20 s lease: on a loaded CI machine two gloo ranks plus the API must not lose a 3 s lease by
# accident (a second "retrying" would be noise); a dead rank still ends the attempt within seconds,
# which the test measures against this lease.
STACK_ENV = {"TUNEYARD_LEASE_SECONDS": "20"}


def _rank_pid(rank: int) -> int | None:
    """Returns the pid of the gang's rank ``rank`` (torchrun sets its RANK), if it runs."""
    for proc in Path("/proc").iterdir():
        try:
            if b"worker.rank_main" in (proc / "cmdline").read_bytes() and \
                    f"RANK={rank}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
        except (OSError, ValueError):
            continue
    return None


def _step(client, run_id: str) -> int:  # noqa: ANN001
    run = client.get(f"/v1/runs/{run_id}").json()
    assert run["status"] not in ("failed", "cancelled"), run["error"]  # fail fast, saying why
    return run["stages"][0]["step"]


def test_sigkill_of_one_rank_resumes_the_run_from_its_last_checkpoint(stack: Stack) -> None:
    stack.start_worker()
    client = stack.client()
    dataset = upload(client, SFT_RECORDS, "sft")
    spec = {**sft_spec(dataset, STEPS, every=EVERY), "resources": {"gpus": 2}}
    run_id = client.post("/v1/runs", json=spec).json()["id"]

    # Past the first checkpoint. The step shows up to ~1.5 s late (the reporter's flush, the status
    # cache), so the kill lands a few steps on, between two checkpoints; STEPS leaves the run far
    # from its end then. (Waiting for a step that is not a multiple of EVERY could miss every one.)
    wait_for(lambda: _step(client, run_id) > EVERY, 300, "a step after the first checkpoint", every=0.05)
    pid = wait_for(lambda: _rank_pid(1), 10, "the second rank's process")
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: any(e["kind"] == "retrying" for e in events(client, run_id)), 60, "the attempt to end")
    ended_within = time.monotonic() - killed
    run = wait_status(client, run_id, {"succeeded", "failed", "cancelled"}, timeout=400)
    log = events(client, run_id)
    assert run["status"] == "succeeded" and run["attempt"] == 2, [(e["attempt"], e["message"]) for e in log]

    lease = float(STACK_ENV["TUNEYARD_LEASE_SECONDS"])
    assert ended_within < lease, "the gang, not the lease, ended the attempt"
    retrying = [e for e in log if e["kind"] == "retrying"]
    resumed = [e for e in log if e["kind"] == "resumed"]
    assert len(retrying) == 1 and retrying[0]["attempt"] == 1
    assert len(resumed) == 1 and resumed[0]["attempt"] == 2
    assert resumed[0]["data"]["step"] % EVERY == 0 and resumed[0]["data"]["step"] >= EVERY
    # Every step exactly once: the keyed upserts rewrite the steps trained again after the resume.
    assert train_steps(client, run_id) == list(range(1, STEPS + 1))
    listed = client.get(f"/v1/runs/{run_id}/checkpoints").json()["data"]
    assert [c["kind"] for c in listed].count("adapter") == 1
