"""Training off the request path: `tuneyard.train_run(run_id)` on the `train` queue."""

from __future__ import annotations

from celery import shared_task

from worker import runs


@shared_task(name="tuneyard.train_run", acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def train_run(run_id: str) -> None:
    runs.train_run(run_id)
