"""Helpers shared by the bench scripts: machine load, process memory, summaries, free ports.

The scripts run as `.venv/bin/python bench/<script>.py`, so this folder is on `sys.path` and
`import common` finds this module.
"""

from __future__ import annotations

import os
import platform
import socket
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def load_average() -> str:
    """Returns the 1/5/15-minute load averages and the CPU count, for the printed header."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def header(title: str) -> str:
    """Returns the first lines every script prints: what, where and how loaded the machine was."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"== {title} ==\n{stamp}  {platform.node()}  python {platform.python_version()}  {load_average()}"


def proc_status_kib(pid: int, field: str) -> int:
    """Returns a memory field of /proc/<pid>/status in KiB (VmHWM = peak RSS, VmRSS = current RSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/{pid}/status")


def tree_pids(pid: int) -> list[int]:
    """Returns the pid and all its descendants (a celery worker's pool children, for example)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Returns the q-quantile (0..1) of already sorted values, nearest-rank."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[index]


def free_port() -> int:
    """Returns a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    """Returns once something accepts connections on 127.0.0.1:port; raises TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout:.0f}s")


@contextmanager
def timed() -> Iterator[list[float]]:
    """Yields a one-element list that holds the block's wall time in seconds when it ends."""
    out = [0.0]
    start = time.perf_counter()
    try:
        yield out
    finally:
        out[0] = time.perf_counter() - start


PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@contextmanager
def fresh_database(name: str, admin_url: str = PG_ADMIN_URL) -> Iterator[str]:
    """Yields the SQLAlchemy URL of a new, migrated PostgreSQL database, dropped afterwards."""
    import psycopg

    from app.db.migrate import migrate

    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0]
    url = f"{base.replace('postgresql://', 'postgresql+psycopg://')}/{name}"
    try:
        migrate(url)
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
