"""The real service as subprocesses (uvicorn API, Celery worker) on one embedded data folder.

Shared by the browser tests and bench/dashboard_load.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from sqlalchemy.orm import Session, sessionmaker

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class LiveService:
    """A running API process, its database (for seeding) and an API key of one team."""

    base_url: str
    key: str
    team_id: str
    data_dir: Path
    sessions: sessionmaker[Session]
    processes: list[subprocess.Popen] = field(default_factory=list)

    def client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.key}"}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """Returns the environment of a service process on its own embedded data folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEYARD_")}
    env.update(TUNEYARD_DATA_DIR=str(data_dir), TUNEYARD_ENV="test", PYTHONUNBUFFERED="1", **extra)
    return env


def wait_for_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"service exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer in {timeout}s:\n{log.read_text()[-4000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_api(data_dir: Path, log_dir: Path) -> tuple[subprocess.Popen, str]:
    """Starts uvicorn on the app factory and returns (process, base_url) once /healthz answers."""
    port = free_port()
    log = log_dir / "api.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:build_app", "--factory",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        cwd=REPO_ROOT, env=service_env(data_dir), stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    base_url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{base_url}/healthz", process, log)
    return process, base_url


def prepare_database(
    data_dir: Path, team_name: str = "browser-tests"
) -> tuple[sessionmaker[Session], str, str]:
    """Migrates the embedded database of `data_dir`; returns (session factory, team id, API key)."""
    from app.db.migrate import migrate
    from app.db.session import make_session_factory
    from app.services.auth import create_api_key
    from app.settings import Settings

    settings = Settings(data_dir=data_dir, env="test")
    migrate(settings.database_url)
    sessions = make_session_factory(settings)
    with sessions() as session:
        team, key = create_api_key(session, team_name)
    return sessions, team.id, key


def start_worker(
    data_dir: Path, log_dir: Path, queues: str = "train,cpu", timeout: float = 90.0
) -> subprocess.Popen:
    """Starts `tuneyard worker` (the command `tuneyard up` runs) and returns it once Celery is ready."""
    log = log_dir / "worker.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "tuneyard_cli", "worker", "--queues", queues, "--concurrency", "1"],
        cwd=REPO_ROOT, env=service_env(data_dir), stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + timeout
    while b" ready." not in log.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            raise RuntimeError(f"worker did not start:\n{log.read_text()[-4000:]}")
        time.sleep(0.3)
    return process
