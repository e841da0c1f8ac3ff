"""Shapes shared by every resource: cursor-paginated lists."""

from __future__ import annotations

from typing import Generic, Literal, TypeVar

from pydantic import BaseModel

T = TypeVar("T")

MAX_PAGE = 100
CURSOR_PATTERN = r"^[a-z]+_[0-9a-z]+$"  # `after` is the id of the last item of the previous page


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
