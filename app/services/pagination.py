"""Cursor pagination over an id column: `limit`, `after` → (items, has_more, next_cursor)."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute, Session

T = TypeVar("T")


def paginate(session: Session, stmt: Select[Any], id_column: InstrumentedAttribute[Any], *,
             limit: int, after: Any | None, newest_first: bool = True) -> tuple[list[Any], bool, str | None]:
    """Returns one page of rows after the cursor; ids are sortable so the cursor is the last id."""
    if after is not None:
        stmt = stmt.where(id_column < after if newest_first else id_column > after)
    stmt = stmt.order_by(id_column.desc() if newest_first else id_column.asc()).limit(limit + 1)
    rows = list(session.scalars(stmt).unique().all())  # unique: rows may join-load a collection
    has_more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = str(getattr(rows[-1], id_column.key)) if has_more and rows else None
    return rows, has_more, next_cursor
