from __future__ import annotations

import threading
import time

import pytest

from app.inference.cache import ModelCache


def _get(cache: ModelCache[str], key: str, size: int) -> str:
    return cache.get(key, lambda: f"weights of {key}", lambda _: size).value


def test_least_recently_used_models_are_evicted_to_stay_within_the_bound() -> None:
    cache: ModelCache[str] = ModelCache(max_bytes=100)
    _get(cache, "a", 40)
    _get(cache, "b", 40)
    _get(cache, "a", 40)  # a is now the most recently used
    _get(cache, "c", 40)
    assert [e.key for e in cache.entries()] == ["a", "c"]
    assert cache.evictions == 1 and cache.accounted_bytes == 80


def test_a_model_larger_than_the_bound_is_served_but_not_retained() -> None:
    cache: ModelCache[str] = ModelCache(max_bytes=100)
    _get(cache, "small", 30)
    assert _get(cache, "huge", 500) == "weights of huge"
    assert [e.key for e in cache.entries()] == ["small"]
    assert cache.accounted_bytes == 30


def test_zero_bound_turns_caching_off() -> None:
    cache: ModelCache[str] = ModelCache(max_bytes=0)
    _get(cache, "a", 1)
    _get(cache, "a", 1)
    assert cache.loads == 2 and cache.accounted_bytes == 0


def test_concurrent_first_requests_load_a_model_once() -> None:
    cache: ModelCache[str] = ModelCache(max_bytes=1000)
    calls: list[str] = []

    def slow_load() -> str:
        calls.append("load")
        time.sleep(0.05)
        return "weights"

    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get("m", slow_load, lambda _: 10).value))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["load"] and results == ["weights"] * 8


def test_a_failed_load_leaves_nothing_behind() -> None:
    cache: ModelCache[str] = ModelCache(max_bytes=1000)

    def broken() -> str:
        raise OSError("no such folder")

    with pytest.raises(OSError):
        cache.get("m", broken, lambda _: 10)
    assert cache.entries() == [] and _get(cache, "m", 10) == "weights of m"
