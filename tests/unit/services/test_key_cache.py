"""The API key cache: one lookup per key at a time, a busy key refreshed before it expires, a key
revoked meanwhile dropped by that refresh."""

from __future__ import annotations

import asyncio
import time

import pytest

from app.errors import Unauthorized
from app.services.auth import KeyCache, KeyEntry


def _lookups(cache: KeyCache, key_hash: str, results: list[object]):  # noqa: ANN202
    """Returns (lookup factory, calls): each lookup yields to the loop, then puts the next result."""
    calls: list[float] = []

    async def lookup() -> KeyEntry:
        calls.append(time.monotonic())
        await asyncio.sleep(0.01)
        result = results[min(len(calls), len(results)) - 1]
        if isinstance(result, Exception):
            raise result
        return cache.put(key_hash, "key_1", "team_1", str(result))

    return lookup, calls


def test_concurrent_misses_share_one_lookup() -> None:
    cache = KeyCache(ttl=5)
    lookup, calls = _lookups(cache, "h", ["a"])

    async def main() -> list[KeyEntry]:
        return await asyncio.gather(*(cache.resolve("h", lookup) for _ in range(100)))

    entries = asyncio.run(main())
    assert len(calls) == 1
    assert {e.team.name for e in entries} == {"a"}


def test_a_bad_key_fails_every_waiter_and_is_not_cached() -> None:
    cache = KeyCache(ttl=5)
    lookup, calls = _lookups(cache, "h", [Unauthorized("invalid API key")])

    async def main() -> list[object]:
        return await asyncio.gather(*(cache.resolve("h", lookup) for _ in range(10)), return_exceptions=True)

    results = asyncio.run(main())
    assert len(calls) == 1 and all(isinstance(r, Unauthorized) for r in results)
    assert cache.get("h") is None


def test_a_key_past_half_its_life_answers_at_once_and_is_refreshed_in_the_background() -> None:
    cache = KeyCache(ttl=0.2)
    lookup, calls = _lookups(cache, "h", ["old", "new"])

    async def main() -> tuple[str, str, str]:
        first = await cache.resolve("h", lookup)
        await asyncio.sleep(0.12)  # past ttl/2, before ttl
        during = await asyncio.gather(*(cache.resolve("h", lookup) for _ in range(20)))
        assert len(calls) == 2  # one background lookup for the twenty uses
        await asyncio.sleep(0.05)
        after = await cache.resolve("h", lookup)
        return first.team.name, {e.team.name for e in during}.pop(), after.team.name

    assert asyncio.run(main()) == ("old", "old", "new")
    assert len(calls) == 2


def test_a_background_lookup_that_finds_the_key_revoked_drops_it() -> None:
    cache = KeyCache(ttl=0.2)
    revoked = Unauthorized("invalid API key")
    lookup, calls = _lookups(cache, "h", ["a", revoked, revoked])

    async def main() -> None:
        await cache.resolve("h", lookup)
        await asyncio.sleep(0.12)
        assert (await cache.resolve("h", lookup)).team.name == "a"  # still within the TTL
        await asyncio.sleep(0.05)  # the refresh landed
        assert cache.get("h") is None
        with pytest.raises(Unauthorized):
            await cache.resolve("h", lookup)

    asyncio.run(main())
    assert len(calls) == 3
