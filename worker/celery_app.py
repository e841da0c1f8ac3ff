"""The Celery app of the workers: `celery -A worker.celery_app worker -Q train,cpu,eval`.

Configuration (queues, routes, late acks, one task per child) lives in app.broker so the API
publishes with exactly the settings the worker consumes with.
"""

from __future__ import annotations

from typing import Any

from celery.signals import worker_ready, worker_shutdown

from app.broker import TASK_MODULES, create_celery
from app.db.session import make_session_factory
from app.settings import get_settings

app = create_celery(get_settings())
app.conf.include = TASK_MODULES
_heartbeats: list[Any] = []


@worker_ready.connect
def _register_devices(sender: Any = None, **_: Any) -> None:
    # In the main worker process, after the pool forked: placement needs a training worker's devices.
    from worker.devices import DeviceHeartbeat

    if "train" not in {queue.name for queue in sender.task_consumer.queues}:
        return
    _heartbeats.append(DeviceHeartbeat(make_session_factory(get_settings()), sender.hostname).start())


@worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    for heartbeat in _heartbeats:
        heartbeat.stop()
