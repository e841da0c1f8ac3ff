"""Migrations on both databases: upgrade head → downgrade base → upgrade head, and no drift."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from app.db.migrate import downgrade, migrate
from app.db.models import Base
from app.db.session import create_db_engine
from tests.api.conftest import PG_ADMIN, REPO, _pg_url


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrations.db'}"
        return
    dbname = f"tuneyard_migrations_{os.getpid()}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{dbname}"')
    try:
        yield _pg_url(dbname)
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


def _tables(url: str) -> set[str]:
    engine = create_db_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def _drift(url: str) -> list:
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            opts = {"compare_type": True, "compare_server_default": True}
            context = MigrationContext.configure(conn, opts=opts)
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def test_up_down_up_and_no_drift(database_url: str) -> None:
    migrate(database_url)
    assert _tables(database_url) == set(Base.metadata.tables)
    downgrade(database_url)
    assert _tables(database_url) == set()
    migrate(database_url)
    assert _tables(database_url) == set(Base.metadata.tables)
    assert _drift(database_url) == []


def test_concurrent_migrations_run_once(database_url: str, tmp_path: Path) -> None:
    code = "import sys; from app.db.migrate import migrate; migrate(sys.argv[1])"
    procs = [subprocess.Popen([sys.executable, "-c", code, database_url], cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE)
             for _ in range(3)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-2000:]
    assert _drift(database_url) == []


def test_cli_migrate_works_from_any_directory(tmp_path: Path) -> None:
    env = {**os.environ, "TUNEYARD_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "tuneyard_cli", "migrate"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert _tables(f"sqlite:///{tmp_path / 'data' / 'tuneyard.db'}") == set(Base.metadata.tables)


def test_invalid_settings_stop_start_up(tmp_path: Path) -> None:
    env = {**os.environ, "TUNEYARD_PORT": "99999", "TUNEYARD_ENV": "prod", "TUNEYARD_AUTH_ENABLED": "false",
           "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "tuneyard_cli", "migrate"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "TUNEYARD_PORT" in result.stderr and "Traceback" not in result.stderr
