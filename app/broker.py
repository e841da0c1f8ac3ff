"""Celery configuration shared by the API (which publishes) and the worker (which consumes).

The database is the source of truth; the broker only carries "X needs work" messages, so no
result backend is configured and task results are ignored.
"""

from __future__ import annotations

import logging

from celery import Celery
from kombu import Exchange, Queue

from app.settings import Settings

log = logging.getLogger("tuneyard.broker")

QUEUES = ("train", "cpu", "eval")
TASK_ROUTES = {
    "tuneyard.train_run": {"queue": "train"},
    "tuneyard.validate_dataset": {"queue": "cpu"},
    "tuneyard.run_eval": {"queue": "eval"},
}
TASK_MODULES = ["worker.tasks.datasets", "worker.tasks.runs", "worker.tasks.evals"]
# Redis re-delivers an unacknowledged message after this long even while it still runs; the
# database lease (claim + heartbeat + attempt) is what stops a second copy, so this only bounds
# how late a message of a dead worker comes back (the reaper re-sends sooner).
VISIBILITY_TIMEOUT_S = 6 * 3600
CONNECT_TIMEOUT_S = 2.0


def broker_options(settings: Settings) -> dict:
    """Returns the broker transport options for the settings' broker URL."""
    if settings.broker_url.startswith("filesystem"):
        queue_dir = settings.broker_dir / "queue"
        processed = settings.broker_dir / "processed"
        # Exchange bindings; kombu's default is ./control in the process's working directory.
        control = settings.broker_dir / "control"
        for folder in (queue_dir, processed, control):
            folder.mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(queue_dir),
            "data_folder_out": str(queue_dir),
            "processed_folder": str(processed),
            "control_folder": str(control),
            "store_processed": False,
        }
    return {
        "visibility_timeout": VISIBILITY_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "max_retries": 1,
    }


def create_celery(settings: Settings) -> Celery:
    """Returns a Celery app configured for the settings (the worker and the API build the same one)."""
    app = Celery("tuneyard", broker=settings.broker_url, include=[])
    filesystem = settings.broker_url.startswith("filesystem")
    app.conf.update(
        broker_transport_options=broker_options(settings),
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=CONNECT_TIMEOUT_S,
        # Each queue on its own exchange and routing key: a bare Queue(name) is bound to the default
        # exchange and key, which copies every message into every queue.
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
        task_default_queue="cpu",
        task_routes=TASK_ROUTES,
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=1,
        worker_hijack_root_logger=False,
        # The filesystem transport has no fanout exchange for remote control; cancellation is
        # cooperative through the database anyway.
        worker_enable_remote_control=not filesystem,
        worker_send_task_events=False,
        task_serializer="json",
        accept_content=["json"],
    )
    return app


def send_task(celery: Celery, name: str, args: list, queue: str | None = None) -> bool:
    """Publishes one task message without retrying; returns False (and logs) if the broker is down."""
    try:
        celery.send_task(name, args=args, queue=queue or TASK_ROUTES.get(name, {}).get("queue"),
                         retry=False, ignore_result=True)
    except Exception as exc:  # any broker/connection error: the database keeps the state
        log.warning("could not publish %s%s to the broker: %s: %s", name, args, type(exc).__name__, exc)
        return False
    return True


def queue_depth(celery: Celery, queue: str) -> int | None:
    """Returns how many ready messages `queue` holds, or None when the broker cannot say.

    Messages a worker has reserved (prefetched or running, not yet acknowledged) are not counted.
    """
    try:
        with celery.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=CONNECT_TIMEOUT_S)
            return int(conn.default_channel.queue_declare(queue=queue, durable=True).message_count)
    except Exception as exc:  # any broker error: the caller falls back to sending what is due
        log.warning("could not read the depth of queue %s: %s: %s", queue, type(exc).__name__, exc)
        return None


def check_broker(celery: Celery, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raises if the broker cannot be reached within `timeout` seconds (used by /readyz)."""
    with celery.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout)
        if conn.transport_cls == "filesystem" or conn.transport.driver_type == "filesystem":
            folder = conn.transport_options.get("data_folder_out")
            if not folder:
                raise RuntimeError("filesystem broker has no data folder")
            from pathlib import Path

            if not Path(folder).is_dir():
                raise RuntimeError(f"filesystem broker folder {folder} is missing")
