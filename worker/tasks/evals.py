"""Eval jobs off the request path: `tuneyard.run_eval(eval_id)` on the `eval` queue."""

from __future__ import annotations

from celery import shared_task

from worker import evals


@shared_task(name="tuneyard.run_eval", acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_eval(eval_id: str) -> None:
    evals.run_eval(eval_id)
