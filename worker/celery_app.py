"""The Celery app of the workers: `celery -A worker.celery_app worker -Q train,cpu,eval`.

Configuration (queues, routes, late acks, one task per child) lives in app.broker so the API
publishes with exactly the settings the worker consumes with.
"""

from __future__ import annotations

from time import monotonic
from typing import Any

from celery.concurrency.asynpool import AsynPool
from celery.concurrency.prefork import TaskPool as PreforkTaskPool
from celery.signals import worker_ready, worker_shutdown

from app.broker import TASK_MODULES, create_celery
from app.db.session import make_session_factory
from app.settings import get_settings

# While a child that exited is not reaped yet, check again this often, for at most this long.
_REAP_RETRY_S = 0.01
_REAP_RETRY_FOR_S = 2.0


class _PromptRespawnAsynPool(AsynPool):
    """Celery's AsynPool, but an exited pool process is replaced at once, never up to 5 s later.

    Celery watches each child's sentinel pipe; when it turns readable it stops watching it and
    calls maintain_pool(), which reaps exited children (waitpid WNOHANG) and forks replacements.
    The kernel closes an exiting child's files (and so wakes the parent) a moment (~1 ms) before
    the child becomes a reapable zombie. When the parent runs inside that window, nothing is
    reaped, no replacement is forked, the sentinel is no longer watched, and the pool stays empty
    until AsynPool's 5 s maintain_pool timer; a task that arrived meanwhile waits up to 5 s. With
    worker_max_tasks_per_child=1 every task ends in such an exit, so this hits often (mostly when
    the worker was idle in epoll as the child exited). Here, when the child was not reaped yet,
    maintain_pool() is retried shortly until it is. (It relies on AsynPool's private
    `_event_process_exit` and `_pool`; were they renamed, the override is never called or finds no
    process, and the pool behaves as Celery's own.)
    """

    def _event_process_exit(self, hub: Any, proc: Any) -> None:
        super()._event_process_exit(hub, proc)
        if proc in getattr(self, "_pool", ()):  # exiting, not yet reapable: retry, not 5 s later
            deadline = monotonic() + _REAP_RETRY_FOR_S

            def retry() -> None:
                if proc not in getattr(self, "_pool", ()):
                    return
                self.maintain_pool()
                if proc in getattr(self, "_pool", ()) and monotonic() < deadline:
                    hub.call_later(_REAP_RETRY_S, retry)

            hub.call_later(_REAP_RETRY_S, retry)


class PromptRespawnPrefork(PreforkTaskPool):
    """The prefork pool with _PromptRespawnAsynPool (selected by worker_pool below)."""

    Pool = _PromptRespawnAsynPool


app = create_celery(get_settings())
app.conf.include = TASK_MODULES
# Used when the worker is started without -P (or with the default -P prefork); -P solo etc. win.
app.conf.worker_pool = "worker.celery_app:PromptRespawnPrefork"
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
