"""Readiness: the database answers a query and the broker accepts a connection."""

from __future__ import annotations

from celery import Celery
from sqlalchemy import text
from sqlalchemy.orm import Session

from app.broker import check_broker
from app.errors import ServiceUnavailable


def check_ready(session: Session, celery: Celery, timeout: float = 2.0) -> None:
    """Returns when the database and broker are reachable; raises ServiceUnavailable naming which is not."""
    try:
        session.execute(text("SELECT 1"))
    except Exception as exc:
        raise ServiceUnavailable(f"database unreachable: {type(exc).__name__}",
                                 code="database_unavailable") from exc
    try:
        check_broker(celery, timeout)
    except Exception as exc:
        raise ServiceUnavailable(f"broker unreachable: {type(exc).__name__}: {exc}",
                                 code="broker_unavailable") from exc
