"""The devices this worker offers, recorded in the database with a heartbeat so placement sees them.

GPUs are read with ``nvidia-smi`` (a separate process: CUDA is never initialised in the worker before
it forks its pool). Without GPUs the worker offers its CPU cores as devices: a multi-device run then
trains on that many gloo ranks, which share the host's memory (recorded whole as the memory per
device; placement sums the ranks' needs on CPU).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from functools import cache

from sqlalchemy.orm import Session, sessionmaker

from app.db.models import WorkerHost, utcnow
from app.jobs.placement import WORKER_HEARTBEAT_SECONDS

log = logging.getLogger("tuneyard.worker.devices")


@dataclass(frozen=True)
class Devices:
    kind: str  # cuda|cpu
    count: int
    memory_per_device_bytes: int
    name: str


def _gpus() -> Devices | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi failed (%s); offering CPU devices", exc)
        return None
    rows = [line.rsplit(",", 1) for line in out.strip().splitlines() if line.strip()]
    if not rows:
        return None
    # Placement assumes equal devices per worker: the smallest one bounds what a run may need.
    memory = min(int(mib.strip()) for _, mib in rows) * 2**20
    return Devices("cuda", len(rows), memory, rows[0][0].strip())


def _host_memory_bytes() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemTotal")


@cache
def detect_devices() -> Devices:
    """Returns the GPUs of this machine, or its CPU cores as devices when it has none."""
    gpus = _gpus()
    if gpus is not None:
        return gpus
    return Devices("cpu", os.cpu_count() or 1, _host_memory_bytes(), "cpu")


def as_worker_host(node: str, devices: Devices) -> WorkerHost:
    """Returns an unsaved worker row describing ``devices`` (what placement compares estimates with)."""
    return WorkerHost(id=node, device_kind=devices.kind, device_count=devices.count,
                      memory_per_device_bytes=devices.memory_per_device_bytes, device_name=devices.name)


def beat(sessions: sessionmaker[Session], node: str, devices: Devices) -> None:
    """Records (or refreshes) this worker's devices and heartbeat."""
    with sessions() as session:
        row = session.get(WorkerHost, node)
        if row is None:
            session.add(as_worker_host(node, devices))
        else:
            row.device_kind, row.device_count = devices.kind, devices.count
            row.memory_per_device_bytes, row.device_name = devices.memory_per_device_bytes, devices.name
            row.heartbeat_at = utcnow()
        session.commit()


class DeviceHeartbeat:
    """Beats every WORKER_HEARTBEAT_SECONDS on a thread of the worker's main process."""

    def __init__(self, sessions: sessionmaker[Session], node: str) -> None:
        self._sessions, self.node = sessions, node
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="device-heartbeat", daemon=True)

    def start(self) -> DeviceHeartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        devices = detect_devices()
        log.info("worker %s offers %d × %s (%d MiB each)", self.node, devices.count, devices.name,
                 devices.memory_per_device_bytes // 2**20)
        while True:
            try:
                beat(self._sessions, self.node, devices)
            except Exception:  # a database hiccup: the next beat retries
                log.exception("worker %s: device heartbeat failed", self.node)
            if self._done.wait(WORKER_HEARTBEAT_SECONDS):
                return
