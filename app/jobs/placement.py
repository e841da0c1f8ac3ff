"""Where a run can train: its fit estimate against the devices the live workers registered.

Placement is a claim that checks capacity, not a queue per size: every training worker consumes
the one `train` queue, and a worker whose devices cannot hold a run (too few, or too little memory
per device for the estimate) leaves it queued for a bigger one. With a handful of worker shapes
this needs no routing table and a new GPU size needs no new queue; docs/scaling.md says when a
queue per size pays off (hundreds of workers, where bouncing messages would cost).

At submit: no registered worker could hold the run → 422 `does_not_fit` with the numbers; no
worker registered at all → accepted with a warning event (a fresh deployment's workers may not
have started yet). A queued run whose workers all went away is answered in `GET /v1/runs/{id}`
(`waiting_reason`).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Event, Run, Team, WorkerHost, utcnow
from app.errors import Unprocessable
from app.inference.resolution import resolve_model
from app.settings import Settings
from app.storage import LocalBlobStore
from trainer_core.config import RunSpec
from trainer_core.estimate import EstimateError, estimate_fit

log = logging.getLogger("tuneyard.placement")

# A worker beats every WORKER_HEARTBEAT_SECONDS; one silent for WORKER_FRESH_SECONDS is gone.
WORKER_HEARTBEAT_SECONDS = 15.0
WORKER_FRESH_SECONDS = 60.0
# Share of a device's memory training tensors may use: the CUDA context, the allocator's
# fragmentation and NCCL buffers take the rest.
USABLE_MEMORY = 0.9


def _gib(value: float) -> str:
    return f"{value / 2**30:.1f} GiB"


def live_workers(session: Session, now: datetime | None = None) -> list[WorkerHost]:
    """Returns the workers that beat within the last WORKER_FRESH_SECONDS."""
    fresh = (now or utcnow()) - timedelta(seconds=WORKER_FRESH_SECONDS)
    return list(session.scalars(select(WorkerHost).where(WorkerHost.heartbeat_at >= fresh)
                                .order_by(WorkerHost.id)))


def can_hold(worker: WorkerHost, estimate: dict[str, Any]) -> bool:
    """Returns whether a worker has the devices and the memory per device the estimate needs.

    A CPU worker's "devices" are its cores and they share the host's memory (its
    ``memory_per_device_bytes`` is the whole host's): all the run's ranks must fit in it together.
    """
    if worker.device_count < estimate["devices"]:
        return False
    peak = estimate["peak_memory_bytes_per_device"]
    needed = peak * estimate["devices"] if worker.device_kind == "cpu" else peak
    return needed <= worker.memory_per_device_bytes * USABLE_MEMORY


def why_not(workers: list[WorkerHost], estimate: dict[str, Any]) -> str:
    """Returns the sentence saying what the run needs and what the workers offer."""
    offered = ", ".join(f"{w.id}: {w.device_count} × {w.device_name} ({_gib(w.memory_per_device_bytes)})"
                        for w in workers) or "none"
    peak = _gib(estimate["peak_memory_bytes_per_device"])
    return (f"the run needs {estimate['devices']} device(s) with {peak} each (estimated peak; "
            f"{USABLE_MEMORY:.0%} of a device's memory is usable); registered workers: {offered}. "
            "Lower batch_size or max_seq_len, use LoRA, or raise resources.gpus")


def estimate_run(session: Session, settings: Settings, team: Team, spec: RunSpec,
                 workers: list[WorkerHost]) -> dict[str, Any] | None:
    """Returns the run's fit estimate for the workers' device kind, None when the config is unreadable."""
    store = LocalBlobStore(settings.storage_dir)
    model = resolve_model(session, settings, store, team, spec.base_model, param="base_model", status=422)
    kinds = {w.device_kind for w in workers}
    kind = "cuda" if "cuda" in kinds or not kinds else "cpu"
    names = [w.device_name for w in workers if w.device_kind == kind]
    try:
        config = json.loads((model.weights_path / "config.json").read_text())
        return estimate_fit(spec, config, device=kind, device_name=names[0] if names else None).as_dict()
    except (OSError, ValueError, EstimateError) as exc:
        log.warning("no fit estimate for %s: %s", spec.base_model, exc)
        return None


def check_fit(
    session: Session, settings: Settings, team: Team, spec: RunSpec
) -> tuple[dict[str, Any] | None, str | None]:
    """Returns (the run's estimate, a warning for its events); 422 does_not_fit if no worker can hold it."""
    workers = live_workers(session)
    estimate = estimate_run(session, settings, team, spec, workers)
    if estimate is None:
        return None, None
    if not workers:
        return estimate, ("no worker has registered yet, so the fit was not checked (estimated peak "
                          f"{_gib(estimate['peak_memory_bytes_per_device'])} per device on "
                          f"{estimate['devices']} device(s))")
    if not any(can_hold(w, estimate) for w in workers):
        raise Unprocessable(f"resources: no registered worker can hold this run: "
                            f"{why_not(workers, estimate)}", code="does_not_fit", param="resources")
    return estimate, None


def claimable_here(session: Session, run_id: str, here: WorkerHost) -> bool:
    """Returns whether this worker may claim the run; records once why not when it cannot hold it."""
    run = session.get(Run, run_id)
    if run is None or run.estimate is None or can_hold(here, run.estimate):
        return True
    message = f"worker {here.id} cannot hold the run and leaves it queued: {why_not([here], run.estimate)}"
    last = session.scalar(select(Event.message).where(Event.run_id == run_id)
                          .order_by(Event.id.desc()).limit(1))
    if last != message:
        session.add(Event(run_id=run_id, attempt=run.attempt, kind="waiting_for_capacity", message=message,
                          level="warning"))
        session.commit()
    return False


def waiting_reason(session: Session, run: Run) -> str | None:
    """Returns why a queued run waits when no live worker can hold it (None when one can, or not queued)."""
    if run.status != "queued" or run.estimate is None:
        return None
    workers = live_workers(session)
    if not workers:
        return "no worker is running; the run starts when one registers"
    if any(can_hold(w, run.estimate) for w in workers):
        return None
    return f"no live worker can hold the run: {why_not(workers, run.estimate)}"
