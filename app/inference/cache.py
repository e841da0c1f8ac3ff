"""A thread-safe LRU of loaded models bounded by their accounted memory, not by their count."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


class FairLock:
    """A lock handed over in arrival order (a plain Lock lets the thread that just released it take
    it straight back), so requests on one model take turns token by token."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._queue: deque[threading.Event] = deque()

    def __enter__(self) -> FairLock:
        turn = threading.Event()
        with self._mutex:
            self._queue.append(turn)
            if len(self._queue) == 1:
                turn.set()
        turn.wait()
        return self

    def __exit__(self, *_: object) -> None:
        with self._mutex:
            self._queue.popleft()
            if self._queue:
                self._queue[0].set()


@dataclass
class CachedModel(Generic[T]):
    """A loaded model and the lock that serialises work on it (one token step at a time)."""

    key: str
    value: T
    size_bytes: int
    lock: FairLock = field(default_factory=FairLock)
    last_used: float = field(default_factory=time.monotonic)


class ModelCache(Generic[T]):
    """Least-recently-used models whose accounted bytes never exceed ``max_bytes``.

    A model is loaded once even when several threads ask for it at the same time (one loading lock
    per key). Loading a model evicts the least recently used ones until it fits. A model larger
    than the whole bound is loaded for the request that asked and not retained, so ``max_bytes=0``
    turns caching off. An evicted model still in use by a request is freed when that request ends.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.evictions = 0
        self.loads = 0
        self._entries: OrderedDict[str, CachedModel[T]] = OrderedDict()
        self._loading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    @property
    def accounted_bytes(self) -> int:
        """Returns the summed size of the models retained now."""
        with self._lock:
            return sum(e.size_bytes for e in self._entries.values())

    def entries(self) -> list[CachedModel[T]]:
        """Returns the retained models, least recently used first."""
        with self._lock:
            return list(self._entries.values())

    def _lookup(self, key: str) -> CachedModel[T] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                entry.last_used = time.monotonic()
            return entry

    def get(self, key: str, load: Callable[[], T], size_of: Callable[[T], int]) -> CachedModel[T]:
        """Returns the cached model under ``key``, loading it with ``load`` if it is not held."""
        entry = self._lookup(key)
        if entry is not None:
            return entry
        with self._lock:
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            entry = self._lookup(key)
            if entry is not None:
                return entry
            value = load()
            entry = CachedModel(key=key, value=value, size_bytes=size_of(value))
            with self._lock:
                self.loads += 1
                self._loading.pop(key, None)
                if entry.size_bytes > self.max_bytes:
                    return entry
                used = sum(e.size_bytes for e in self._entries.values())
                while self._entries and used + entry.size_bytes > self.max_bytes:
                    _, evicted = self._entries.popitem(last=False)
                    used -= evicted.size_bytes
                    self.evictions += 1
                self._entries[key] = entry
            return entry

    def clear(self) -> None:
        """Drops every retained model."""
        with self._lock:
            self._entries.clear()
