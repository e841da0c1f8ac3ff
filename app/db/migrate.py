"""`tuneyard migrate`: Alembic upgrade under a lock, so concurrent start-ups migrate once.

PostgreSQL: a session-level `pg_advisory_lock`; SQLite: an fcntl lock on a file next to the db.
The Alembic configuration is built in code from the installed `migrations` package, so this
works from any directory.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, text

import migrations
from app.db.session import create_db_engine, sqlite_path

log = logging.getLogger("tuneyard.migrate")

# Arbitrary constant shared by every Tuneyard process: "the migration lock".
ADVISORY_LOCK_ID = 0x7475_6E65_7961


def alembic_config(database_url: str, connection: Connection | None = None) -> Config:
    """Returns an Alembic config pointing at the packaged migrations and the given database."""
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.attributes["database_url"] = database_url
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def migrate(database_url: str, revision: str = "head") -> None:
    """Upgrades the database to `revision`, waiting for any other process migrating it."""
    engine = create_db_engine(database_url)
    try:
        db_file = sqlite_path(database_url)
        if engine.dialect.name == "sqlite":
            lock = _file_lock(db_file.with_name(db_file.name + ".migrate.lock")) if db_file else _no_lock()
            with lock, engine.connect() as connection:
                command.upgrade(alembic_config(database_url, connection), revision)
                connection.commit()
            return
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": ADVISORY_LOCK_ID})
            connection.commit()
            try:
                command.upgrade(alembic_config(database_url, connection), revision)
                connection.commit()
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": ADVISORY_LOCK_ID})
                connection.commit()
    finally:
        engine.dispose()


def downgrade(database_url: str, revision: str = "base") -> None:
    """Downgrades the database to `revision` (tests and manual rollbacks)."""
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as connection:
            command.downgrade(alembic_config(database_url, connection), revision)
            connection.commit()
    finally:
        engine.dispose()


@contextmanager
def _no_lock() -> Iterator[None]:
    yield
