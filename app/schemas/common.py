"""Shapes shared by every resource: cursor-paginated lists."""

from __future__ import annotations

from typing import Annotated, Generic, Literal, TypeVar

from fastapi import Query
from pydantic import BaseModel

T = TypeVar("T")

MAX_PAGE = 100
CURSOR_PATTERN = r"^[a-z]+_[0-9a-z]+$"  # `after` is the id of the last item of the previous page
# The `after` parameter of every id-cursor list: one declaration, so no list forgets the pattern.
Cursor = Annotated[str | None, Query(max_length=64, pattern=CURSOR_PATTERN,
                                     description="the next_cursor of the previous page")]


class ListPage(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    next_cursor: str | None = None


class OpenAIPage(BaseModel, Generic[T]):
    """A list in OpenAI's shape: the SDK pages with `after` = the id of the last item."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
