"""Engine and session factory built from the settings (SQLite: WAL + foreign keys; Postgres: a pool)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from app.settings import Settings

SQLITE_BUSY_TIMEOUT_MS = 30_000


def sqlite_path(database_url: str) -> Path | None:
    """Returns the file of a SQLite URL (None for in-memory or non-SQLite URLs)."""
    url = make_url(database_url)
    if not url.drivername.startswith("sqlite") or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def create_db_engine(database_url: str) -> Engine:
    """Returns an engine for the URL, creating the folder of a SQLite file when needed."""
    url = make_url(database_url)
    if url.drivername.startswith("sqlite"):
        path = sqlite_path(database_url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        )
        event.listen(engine, "connect", _on_sqlite_connect)
        return engine
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    # No pre-ping: a round trip per checkout is a third of a status poll; recycling retires old
    # connections and a dead one fails one request, which the client retries.
    return create_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=False, pool_recycle=1800)


def make_session_factory(settings: Settings) -> sessionmaker[Session]:
    """Returns a session factory bound to a new engine for the settings' database."""
    return sessionmaker(bind=create_db_engine(settings.database_url), expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """Yields a session that commits on success and rolls back on error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
