"""Integration stack: PostgreSQL + Redis (a dedicated, empty db number), the API in a uvicorn
subprocess, the reaper in a subprocess and real `celery worker` subprocesses — each in its own
process group so a test can SIGKILL a whole worker (pool parent and child) the way a dead machine
would. Lease timings are short (heartbeat 0.5 s, lease 3 s, reaper every 0.5 s) so recovery
happens within seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis

from app.settings import Settings
from app.storage import LocalBlobStore
from tests.api.conftest import PG_ADMIN, REDIS_HOST, REPO, _free_redis_db, _pg_url

FAST = {"heartbeat_seconds": "0.5", "lease_seconds": "3", "reaper_interval_seconds": "0.5",
        "queued_grace_seconds": "4", "max_attempts": "3", "webhook_retry_base_seconds": "0.3",
        "webhook_poll_seconds": "0.2", "webhook_timeout_seconds": "2"}
WORKER_READY_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Returns the environment that makes a subprocess build exactly these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEYARD_")}
    env.update({f"TUNEYARD_{k.upper()}": v for k, v in FAST.items()})
    env.update(
        TUNEYARD_DATA_DIR=str(settings.data_dir), TUNEYARD_DATABASE_URL=settings.database_url,
        TUNEYARD_BROKER_URL=settings.broker_url, TUNEYARD_STORAGE_DIR=str(settings.storage_dir),
        TUNEYARD_BASE_MODELS_DIR=str(settings.base_models_dir), TUNEYARD_ENV="test",
        PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1", **extra,
    )
    return env


@dataclass
class Worker:
    process: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILLs the worker's whole process group (pool parent and children) at once."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


@dataclass
class Stack:
    settings: Settings
    base_url: str
    key: str
    redis_url: str
    logs: Path
    processes: list[subprocess.Popen] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)
    reapers: int = 0
    # TUNEYARD_* values of this stack's processes over FAST (a module's STACK_ENV, see `stack`).
    env: dict[str, str] = field(default_factory=dict)

    def client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.key}"}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)

    def start_worker(self, concurrency: int = 1, **env: str) -> Worker:
        """Starts `celery worker` (prefork, one task per child) and returns once it is ready.

        ``env``: extra environment variables of the worker (e.g. a judge's API key).
        """
        n = len(self.workers)
        log = self.logs / f"worker-{n}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "train,cpu",
             "-c", str(concurrency), "--without-mingle", "--without-gossip", "--loglevel", "INFO",
             "-n", f"it-{os.getpid()}-{n}@%h"],
            cwd=REPO, env=service_env(self.settings, **{**self.env, **env}), stdout=log.open("wb"),
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        worker = Worker(process, log)
        self.workers.append(worker)
        deadline = time.monotonic() + WORKER_READY_S
        while " ready." not in worker.text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"celery worker did not start:\n{worker.text()[-3000:]}")
            time.sleep(0.2)
        return worker

    def start_reaper(self) -> subprocess.Popen:
        """Starts the reaper (with its webhook deliverer thread) in its own process group."""
        log = self.logs / ("reaper.log" if self.reapers == 0 else f"reaper-{self.reapers}.log")
        self.reapers += 1
        process = subprocess.Popen([sys.executable, "-m", "tuneyard_cli", "reaper"], cwd=REPO,
                                   env=service_env(self.settings, **self.env), stdout=log.open("wb"),
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        return process

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.stop()


def _wait_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          tiny_model_dir: Path) -> Iterator[Stack]:
    """Yields the PostgreSQL + Redis stack with the API and the reaper running (workers per test).

    A test module may set `STACK_ENV = {"TUNEYARD_…": "…"}` to change settings of its stack.
    """
    from app.db.migrate import migrate
    from app.db.session import make_session_factory
    from app.services.auth import create_api_key

    root = tmp_path_factory.mktemp("integration")
    dbname = f"tuneyard_it_{os.getpid()}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{dbname}"')
    db = _free_redis_db()
    redis_url = f"{REDIS_HOST}/{db}"
    settings = Settings(data_dir=root / "data", storage_dir=root / "storage",
                        base_models_dir=root / "models", database_url=_pg_url(dbname),
                        broker_url=redis_url, env="test")
    shutil.copytree(tiny_model_dir, root / "models" / "tiny-llama")
    migrate(settings.database_url)
    sessions = make_session_factory(settings)
    with sessions() as session:
        _, key = create_api_key(session, "integration")
    sessions.kw["bind"].dispose()
    logs = root / "logs"
    logs.mkdir()
    port = free_port()
    env = dict(getattr(request.module, "STACK_ENV", {}))
    api_log = logs / "api.log"
    api = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:build_app", "--factory", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"],
        cwd=REPO, env=service_env(settings, **env), stdout=api_log.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True)
    stack = Stack(settings, f"http://127.0.0.1:{port}", key, redis_url, logs, [api], env=env)
    stack.start_reaper()
    try:
        _wait_http(f"{stack.base_url}/healthz", api, api_log)
        yield stack
    finally:
        stack.stop_workers()
        for process in stack.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(20)
        redis.Redis.from_url(redis_url).flushdb()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


# ---------------------------------------------------------------- API helpers

SFT_RECORDS = [{"prompt": f"What is {i} plus {i}?", "completion": f" It is {2 * i}."} for i in range(48)]
PREFERENCE_RECORDS = [{"prompt": f"Name the number {i}.", "chosen": f" {i}.", "rejected": f" Not {i}, no."}
                      for i in range(32)]


def upload(client: httpx.Client, records: list[dict[str, Any]], fmt: str, timeout: float = 60) -> str:
    """Returns the id of a dataset uploaded as a JSONL body, once the worker validated it."""
    body = "".join(json.dumps(r) + "\n" for r in records).encode()
    response = client.post("/v1/datasets", content=body, params={"format": fmt, "name": f"it-{fmt}"},
                           headers={"Content-Type": "application/jsonl"})
    assert response.status_code == 201, response.text
    dataset_id = response.json()["id"]
    wait_for(lambda: client.get(f"/v1/datasets/{dataset_id}").json()["status"] != "validating", timeout,
             f"dataset {dataset_id} validated")
    assert client.get(f"/v1/datasets/{dataset_id}").json()["status"] == "ready"
    return dataset_id


def sft_spec(dataset_id: str, max_steps: int, every: int = 2, **extra: Any) -> dict[str, Any]:
    return {"name": "it", "base_model": "tiny-llama", "seed": 3,
            "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "stages": [{"method": "sft", "datasets": [{"id": dataset_id}], "max_steps": max_steps,
                        "batch_size": 4, "max_seq_len": 64, "learning_rate": 1e-3}],
            "checkpoint_every_steps": every, "keep_checkpoints": 2, **extra}


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    """Returns the predicate's first truthy value, polling; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_status(client: httpx.Client, run_id: str, statuses: set[str], timeout: float = 180) -> dict:
    return wait_for(lambda: (r := client.get(f"/v1/runs/{run_id}").json())["status"] in statuses and r,
                    timeout, f"run {run_id} to reach {statuses}", every=0.2)


def events(client: httpx.Client, run_id: str) -> list[dict[str, Any]]:
    return client.get(f"/v1/runs/{run_id}/events", params={"limit": 100}).json()["data"]


def train_steps(client: httpx.Client, run_id: str, stage: int = 0) -> list[int]:
    """Returns the steps with a train point, in order, with no downsampling."""
    body = client.get(f"/v1/runs/{run_id}/metrics",
                      params={"stage": stage, "split": "train", "names": "loss", "max_points": 10000}).json()
    return [int(p[0]) for p in body["data"][0]["points"]] if body["data"] else []


def read_stream(client: httpx.Client, run_id: str, sink: list[dict[str, Any]],
                last_event_id: str | None = None) -> None:
    """Appends the messages of the run's SSE stream to `sink` ({event, id, data, at}) until it ends."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    message: dict[str, Any] = {}
    with client.stream("GET", f"/v1/runs/{run_id}/stream", headers=headers, timeout=None) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                if "event" in message:
                    sink.append({**message, "at": time.monotonic()})
                message = {}
            elif line.startswith("event: "):
                message["event"] = line[7:]
            elif line.startswith("id: "):
                message["id"] = line[4:]
            elif line.startswith("data: "):
                message["data"] = json.loads(line[6:])


# ---------------------------------------------------------------- in-process embedded stack


def embedded_services(settings: Settings, tiny_model_dir: Path) -> tuple[Any, LocalBlobStore]:
    """Returns (sessions, store) of an in-process stack on the settings' SQLite file, migrated, with
    the tiny model installed as `tiny-llama` (tests that call `execute_run` without a worker)."""
    from app.db.migrate import migrate
    from app.db.session import make_session_factory

    shutil.copytree(tiny_model_dir, settings.base_models_dir / "tiny-llama")
    migrate(settings.database_url)
    return make_session_factory(settings), LocalBlobStore(settings.storage_dir)


def stored_dataset(session: Any, store: LocalBlobStore, team_id: str, records: list[dict[str, Any]],
                   fmt: str) -> str:
    """Returns the id of a `ready` dataset of the team holding the records, stored as an upload is."""
    from app.db.models import Dataset
    from app.ids import new_id

    dataset_id = new_id("ds")
    key = f"datasets/{dataset_id}.jsonl"
    size, sha = store.write_bytes(key, "".join(json.dumps(r) + "\n" for r in records).encode())
    session.add(Dataset(id=dataset_id, team_id=team_id, name=fmt, format=fmt, status="ready",
                        num_records=len(records), size_bytes=size, sha256=sha, blob_key=key))
    return dataset_id
