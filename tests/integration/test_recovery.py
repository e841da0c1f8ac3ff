"""Runs that survive: a SIGKILLed worker, a message delivered twice, a broker that lost its queue,
and a cancel followed by a resume — all on PostgreSQL + Redis with real worker subprocesses."""

from __future__ import annotations

import os
import subprocess
import time

import redis

from app.broker import create_celery
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

STEPS = 40
KILL_STEPS = 300  # a tiny-model step takes ~20 ms: enough of them to kill between checkpoints
CANCEL_STEPS = 300  # long enough that an idle machine cannot finish before the cancel lands
REDIS_START = ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
               "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis",
               "--logfile", "/var/log/redis/ci.log"]


def _step(client, run_id: str) -> int:  # noqa: ANN001
    return client.get(f"/v1/runs/{run_id}").json()["stages"][0]["step"]


def _resume_checkpoints(client, run_id: str) -> list[int]:  # noqa: ANN001
    listed = client.get(f"/v1/runs/{run_id}/checkpoints").json()["data"]
    return sorted(c["step"] for c in listed if c["kind"] == "resume")


def test_sigkill_mid_stage_resumes_from_last_checkpoint(stack: Stack) -> None:
    worker = stack.start_worker()
    client = stack.client()
    dataset = upload(client, SFT_RECORDS, "sft")
    spec = sft_spec(dataset, KILL_STEPS, every=100)
    spec["stages"][0]["batch_size"] = 16
    run_id = client.post("/v1/runs", json=spec).json()["id"]
    # Killed between checkpoints, so the steps after the resume point are trained twice.
    wait_for(lambda: (s := _step(client, run_id)) > 100 and s % 100 or s >= 250, 120,
             "a step between two checkpoints", every=0.02)
    worker.kill()
    killed_at = max(train_steps(client, run_id))
    last_checkpoint = max(_resume_checkpoints(client, run_id))
    stack.start_worker()
    run = wait_status(client, run_id, {"succeeded", "failed", "cancelled"}, timeout=180)
    assert run["status"] == "succeeded" and run["attempt"] == 2, run

    log = events(client, run_id)
    requeued = [e for e in log if e["kind"] == "requeued"]
    resumed = [e for e in log if e["kind"] == "resumed"]
    assert len(requeued) == 1 and requeued[0]["attempt"] == 1
    assert len(resumed) == 1 and resumed[0]["attempt"] == 2
    resume_step = resumed[0]["data"]["step"]
    assert resume_step == last_checkpoint <= killed_at
    rewritten = killed_at - resume_step
    assert resumed[0]["message"].endswith("after a lost worker")
    # Every step exactly once: those before the resume point from attempt 1, the rest rewritten
    # by attempt 2 (keyed upserts), none missing in between.
    assert train_steps(client, run_id) == list(range(1, KILL_STEPS + 1))
    print(f"\nSIGKILL at step {killed_at}; last checkpoint {last_checkpoint}; "
          f"resumed from step {resume_step} ({rewritten} steps trained again, each stored once)")


def test_message_delivered_twice_trains_once(stack: Stack) -> None:
    stack.stop_workers()
    worker = stack.start_worker(concurrency=2)  # both copies are taken at once, by two processes
    client = stack.client()
    dataset = upload(client, SFT_RECORDS, "sft")
    run_id = client.post("/v1/runs", json=sft_spec(dataset, 12, every=4)).json()["id"]
    create_celery(stack.settings).send_task("tuneyard.train_run", args=[run_id], queue="train")
    run = wait_status(client, run_id, {"succeeded", "failed", "cancelled"})
    assert run["status"] == "succeeded" and run["attempt"] == 1
    claims = [e for e in events(client, run_id) if e["kind"] == "claimed"]
    assert len(claims) == 1
    wait_for(lambda: f"run {run_id}: not claimed" in worker.text(), 30, "the second copy to exit")
    assert worker.text().count(f"run {run_id}: attempt 1 claimed") == 1
    assert train_steps(client, run_id) == list(range(1, 13))


def _lose_queued_messages(stack: Stack) -> None:
    """Makes the broker forget its queue the way a restart without persistence does.

    By default Redis is really restarted (the server keeps nothing on disk, so the queue is gone).
    On a Redis shared with other test runs, TUNEYARD_IT_SHARED_REDIS=1 only flushes this suite's
    database and disconnects its clients, which is what a restart does to this suite.
    """
    if os.environ.get("TUNEYARD_IT_SHARED_REDIS") != "1":
        subprocess.run(["redis-cli", "shutdown", "nosave"], check=False, timeout=10)
        subprocess.run(REDIS_START, check=True, timeout=10)
        wait_for(lambda: _ping(stack.redis_url), 10, "redis to come back")
        return
    conn = redis.Redis.from_url(stack.redis_url)
    conn.flushdb()
    db = conn.connection_pool.connection_kwargs["db"]
    me = conn.client_id()
    for client in conn.client_list():
        if int(client["db"]) == db and int(client["id"]) != me:
            conn.client_kill_filter(_id=client["id"])


def _ping(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url).ping())
    except redis.RedisError:
        return False


def test_broker_loses_queued_message_and_run_still_executes(stack: Stack) -> None:
    stack.start_worker()
    client = stack.client()
    dataset = upload(client, SFT_RECORDS, "sft")
    stack.stop_workers()
    run_id = client.post("/v1/runs", json=sft_spec(dataset, 6, every=3)).json()["id"]
    never_started = client.post("/v1/runs", json=sft_spec(dataset, 6, every=3)).json()["id"]
    assert client.post(f"/v1/runs/{never_started}/cancel").json()["status"] == "cancelled"
    _lose_queued_messages(stack)
    assert redis.Redis.from_url(stack.redis_url).llen("train") == 0
    started = time.monotonic()
    stack.start_worker()
    run = wait_status(client, run_id, {"succeeded", "failed", "cancelled"})
    assert run["status"] == "succeeded" and run["attempt"] == 1
    print(f"\nqueued message lost; run {run_id} succeeded {time.monotonic() - started:.1f}s after "
          "the worker started")
    cancelled = client.get(f"/v1/runs/{never_started}").json()
    assert cancelled["status"] == "cancelled" and cancelled["attempt"] == 0
    assert cancelled["started_at"] is None
    assert not [e for e in events(client, never_started) if e["kind"] == "claimed"]


def test_cancel_mid_run_then_resume(stack: Stack) -> None:
    stack.start_worker()
    client = stack.client()
    dataset = upload(client, SFT_RECORDS, "sft")
    run_id = client.post("/v1/runs", json=sft_spec(dataset, CANCEL_STEPS, every=50)).json()["id"]
    wait_for(lambda: _step(client, run_id) >= 8, 120, "eight steps", every=0.05)
    asked = time.monotonic()
    assert client.post(f"/v1/runs/{run_id}/cancel").json()["status"] == "cancelling"
    run = wait_status(client, run_id, {"cancelled", "succeeded", "failed"}, timeout=10)
    latency = time.monotonic() - asked
    assert run["status"] == "cancelled" and latency < 5.0, (run["status"], latency)
    stopped_at = run["stages"][0]["step"]
    assert run["stages"][0]["status"] == "cancelled" and stopped_at < CANCEL_STEPS
    assert max(_resume_checkpoints(client, run_id)) == stopped_at  # saved on the way out

    resumed = client.post(f"/v1/runs/{run_id}/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] == "queued"
    run = wait_status(client, run_id, {"succeeded", "failed", "cancelled"})
    assert run["status"] == "succeeded" and run["attempt"] == 2
    resume_event = next(e for e in events(client, run_id) if e["kind"] == "resumed")
    assert resume_event["data"]["step"] == stopped_at
    assert resume_event["message"].endswith("after a resume request")
    assert train_steps(client, run_id) == list(range(1, CANCEL_STEPS + 1))
    assert client.post(f"/v1/runs/{run_id}/resume").status_code == 409
    print(f"\ncancel latency {latency:.2f}s; stopped at step {stopped_at}; resumed to {CANCEL_STEPS}")
