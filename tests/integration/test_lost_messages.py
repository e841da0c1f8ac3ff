"""Messages the broker lost, on PostgreSQL + Redis with the reaper and a real worker subprocess: a
dataset whose validation message vanished becomes ready anyway, and a second copy of the message
changes nothing."""

from __future__ import annotations

import json

import redis

from app.broker import create_celery, send_task
from tests.integration.conftest import FAST, SFT_RECORDS, Stack, wait_for


def test_a_lost_validation_message_is_sent_again_by_the_reaper(stack: Stack) -> None:
    client = stack.client()
    broker = redis.Redis.from_url(stack.redis_url)
    body = "".join(json.dumps(r) + "\n" for r in SFT_RECORDS).encode()
    created = client.post("/v1/datasets", content=body, params={"format": "sft", "name": "lost"},
                          headers={"Content-Type": "application/jsonl"})
    assert created.status_code == 201, created.text
    dataset_id = created.json()["id"]
    # No worker is running yet: the message waits in the `cpu` list. Lose it, as a Redis restart
    # without persistence (or a broker down at upload time) would.
    assert broker.llen("cpu") == 1 and dataset_id in broker.lindex("cpu", 0).decode()
    broker.delete("cpu")

    worker = stack.start_worker()
    grace = float(FAST["queued_grace_seconds"])
    ready = wait_for(lambda: (d := client.get(f"/v1/datasets/{dataset_id}").json())["status"] != "validating"
                     and d, grace + 30, f"dataset {dataset_id} validated after a re-send")
    assert ready["status"] == "ready" and ready["num_records"] == len(SFT_RECORDS), ready
    reaper_log = (stack.logs / "reaper.log").read_text()
    assert reaper_log.count(f"dataset {dataset_id}: no worker took the dataset within") == 1

    # A duplicate (Redis re-delivery, a late re-send) finds nothing to validate.
    send_task(create_celery(stack.settings), "tuneyard.validate_dataset", [dataset_id])
    wait_for(lambda: f"dataset {dataset_id}: nothing to validate (ready)" in worker.text(), 30,
             "the duplicate message to be skipped")
    assert client.get(f"/v1/datasets/{dataset_id}").json() == ready
