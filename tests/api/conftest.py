"""API test fixtures: the SAME test modules run against SQLite and against PostgreSQL.

`backend` is a session fixture parametrised over both databases. Each backend gets:
- a fresh database (a SQLite file in a temp dir, or `tuneyard_test_<pid>` on the local
  PostgreSQL, dropped afterwards), migrated with `app.db.migrate.migrate`;
- its matching broker (kombu filesystem folders for SQLite, an empty Redis db for PostgreSQL);
- a REAL Celery worker subprocess (`celery -A worker.celery_app worker -Q cpu`) configured
  through TUNEYARD_* environment variables, so uploads are validated off the request path.
The app under test is `create_app(settings)` driven through Starlette's TestClient.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.db.migrate import migrate
from app.main import create_app
from app.services.auth import create_api_key
from app.settings import Settings

REPO = Path(__file__).resolve().parents[2]
PG_ADMIN = os.environ.get("TUNEYARD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_HOST = os.environ.get("TUNEYARD_TEST_REDIS", "redis://127.0.0.1:6379")
WORKER_READY_S = 90


@dataclass
class Backend:
    name: str
    settings: Settings
    app: FastAPI


def _pg_url(dbname: str) -> str:
    base = PG_ADMIN.rsplit("/", 1)[0]
    return f"{base.replace('postgresql://', 'postgresql+psycopg://', 1)}/{dbname}"


def _free_redis_db() -> int:
    """Returns a Redis db number (1–15) that is empty now, so other suites' queues are not shared."""
    start = os.getpid() % 15
    for offset in range(15):
        db = 1 + (start + offset) % 15
        if redis.Redis.from_url(f"{REDIS_HOST}/{db}").dbsize() == 0:
            return db
    pytest.skip("no empty Redis database for the worker's broker")


def write_safetensors_header(path: Path, shapes: dict[str, list[int]]) -> None:
    """Writes a safetensors file holding only its header: tensor names and shapes, no data."""
    header = {name: {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}
              for name, shape in shapes.items()}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


# A Llama-shaped folder the submit-time checks accept (config, weights, tokenizer); no run here
# ever loads it: the API tests' worker only validates datasets.
TINY_LLAMA_MODULES = {
    "model.embed_tokens.weight": [32, 8], "lm_head.weight": [32, 8], "model.norm.weight": [8],
    **{f"model.layers.0.{part}.weight": [8, 8] for part in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")},
}


def write_model_folder(folder: Path, shapes: dict[str, list[int]] = TINY_LLAMA_MODULES) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    write_safetensors_header(folder / "model.safetensors", shapes)
    (folder / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}, "added_tokens": []}')
    return folder


def _settings(name: str, root: Path) -> tuple[Settings, callable]:
    models = root / "models"
    write_model_folder(models / "tiny-llama")
    common = dict(data_dir=root / "data", storage_dir=root / "storage", base_models_dir=models,
                  env="test", max_upload_bytes=64 * 1024 * 1024)
    if name == "sqlite":
        return Settings(**common), lambda: None
    dbname = f"tuneyard_test_{os.getpid()}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{dbname}"')
    db = _free_redis_db()
    settings = Settings(**common, database_url=_pg_url(dbname), broker_url=f"{REDIS_HOST}/{db}")

    def cleanup() -> None:
        redis.Redis.from_url(f"{REDIS_HOST}/{db}").flushdb()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')

    return settings, cleanup


def worker_env(settings: Settings) -> dict[str, str]:
    """Returns the environment that makes a subprocess build the same settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEYARD_")}
    env.update(
        TUNEYARD_DATA_DIR=str(settings.data_dir), TUNEYARD_DATABASE_URL=settings.database_url,
        TUNEYARD_BROKER_URL=settings.broker_url, TUNEYARD_STORAGE_DIR=str(settings.storage_dir),
        TUNEYARD_BASE_MODELS_DIR=str(settings.base_models_dir), TUNEYARD_ENV="test",
        PYTHONPATH=str(REPO),
    )
    return env


@pytest.fixture(scope="session")
def worker_process_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[callable]:
    started: list[subprocess.Popen] = []

    def start(settings: Settings, name: str, queues: str = "cpu") -> subprocess.Popen:
        log_path = tmp_path_factory.mktemp(f"worker-{name}") / "worker.log"
        log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the worker
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", queues, "-P", "solo",
             "-c", "1", "--without-mingle", "--without-gossip", "--without-heartbeat", "--loglevel", "INFO",
             "-n", f"test-{name}-{os.getpid()}@%h"],
            cwd=REPO, env=worker_env(settings), stdout=log, stderr=subprocess.STDOUT,
        )
        started.append(proc)
        deadline = time.monotonic() + WORKER_READY_S
        while b" ready." not in log_path.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"celery worker did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        proc.log_path = log_path  # type: ignore[attr-defined]
        return proc

    yield start
    for proc in started:
        proc.terminate()
    for proc in started:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            worker_process_factory: callable) -> Iterator[Backend]:
    name = request.param
    settings, cleanup = _settings(name, tmp_path_factory.mktemp(f"backend-{name}"))
    try:
        migrate(settings.database_url)
        worker_process_factory(settings, name)
        app = create_app(settings)
        yield Backend(name, settings, app)
        app.state.sessions.kw["bind"].dispose()
    finally:
        cleanup()


@pytest.fixture
def client(backend: Backend) -> Iterator[TestClient]:
    with TestClient(backend.app, raise_server_exceptions=False) as test_client:
        yield test_client


_team_counter = iter(range(10**9))


def new_team_headers(backend: Backend, prefix: str = "team") -> dict[str, str]:
    """Returns Bearer headers for a key of a new, uniquely named team."""
    with backend.app.state.sessions() as session:
        _, key = create_api_key(session, f"{prefix}-{os.getpid()}-{next(_team_counter)}")
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def auth(backend: Backend) -> dict[str, str]:
    return new_team_headers(backend, "a")


@pytest.fixture
def other_auth(backend: Backend) -> dict[str, str]:
    return new_team_headers(backend, "b")


def wait_for_dataset(client: TestClient, headers: dict[str, str], dataset_id: str,
                     timeout: float = 60) -> dict:
    """Returns the dataset once the worker has validated it (status no longer `validating`)."""
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"/v1/datasets/{dataset_id}", headers=headers).json()
        if body.get("status") != "validating":
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"dataset {dataset_id} still validating after {timeout}s")
        time.sleep(0.25)


def upload_jsonl(client: TestClient, headers: dict[str, str], data: bytes, **params: str) -> dict:
    response = client.post("/v1/datasets", content=data, params=params,
                           headers={**headers, "Content-Type": "application/jsonl"})
    assert response.status_code == 201, response.text
    return response.json()
