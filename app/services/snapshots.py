"""Serialised answers of a run's polled reads (status, metrics), kept for about a second per API process.

Dashboards and scripts poll a run every second or two; most polls in between find nothing new.
An entry holds the JSON body and the *version* of the run it was computed from (its status and
its stages' statuses and steps: the reporter moves a stage's step with every batch of metrics it
writes). Within `ttl` an entry is served as it is; after that, one cheap look at the version
decides whether the body is still right (a finished run's chart is then never computed again)
or is recomputed. A state change this process makes (cancel, resume) drops the run's entries at
once; a worker's changes show within `ttl`.

Which team owns a run never changes, so it is remembered (bounded) and checked on every hit.
Under many pollers an expiring entry would send all of them to the database at once; one load
per (run, answer, team) runs at a time (`answer`), and meanwhile the others get the entry they
had — stale by at most that one load.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.db.models import Run, RunStage
from app.services.owned import not_found

MAX_RUNS = 4096  # runs with cached answers; the least recently used are dropped beyond it


@dataclass(frozen=True)
class Snapshot:
    body: bytes
    version: Hashable
    fresh_until: float  # time.monotonic()


def run_version(session: Session, run_id: str) -> tuple[str, tuple[Any, ...]] | None:
    """Returns (owning team id, what the run's cached answers depend on), None for no such run;
    one small query."""
    rows = session.execute(
        select(Run.team_id, Run.status, Run.attempt, RunStage.index, RunStage.status, RunStage.step)
        .outerjoin(RunStage, RunStage.run_id == Run.id).where(Run.id == run_id)
        .order_by(RunStage.index)).all()
    if not rows:
        return None
    return rows[0][0], tuple(tuple(r[1:]) for r in rows)


class SnapshotCache:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._runs: OrderedDict[str, dict[Hashable, Snapshot]] = OrderedDict()
        self._owners: OrderedDict[str, str] = OrderedDict()
        self._flights: dict[tuple[str, Hashable, str], asyncio.Future[bytes]] = {}
        self._lock = threading.Lock()

    async def answer(self, run_id: str, key: Hashable, team_id: str, load: Callable[[], bytes]) -> bytes:
        """Returns the team's cached answer `key` about the run, or runs `load` (in a thread; it checks
        ownership and fills the cache) — once at a time per answer, the others served what there is."""
        owner = self._owners.get(run_id)
        if owner is not None and owner != team_id:
            raise not_found(Run, run_id)
        snapshot = self._runs.get(run_id, {}).get(key) if owner is not None else None
        if snapshot is not None and snapshot.fresh_until >= time.monotonic():
            return snapshot.body
        flight_key = (run_id, key, team_id)
        flight = self._flights.get(flight_key)
        if flight is not None and snapshot is not None:
            return snapshot.body
        if flight is None:
            flight = asyncio.ensure_future(run_in_threadpool(load))
            self._flights[flight_key] = flight
            flight.add_done_callback(lambda done: self._landed(flight_key, done))
        # shielded: a client that goes away does not cancel the load the others wait for
        return await asyncio.shield(flight)

    def _landed(self, flight_key: tuple[str, Hashable, str], done: asyncio.Future[bytes]) -> None:
        self._flights.pop(flight_key, None)
        if not done.cancelled():
            done.exception()  # retrieved here, raised to whoever awaited it

    def stale(self, run_id: str, key: Hashable, version: Hashable) -> bytes | None:
        """Returns the body of an entry computed at `version` (made fresh again), or None."""
        snapshot = self._runs.get(run_id, {}).get(key)
        if snapshot is None or snapshot.version != version:
            return None
        self.put(run_id, key, snapshot.body, version)
        return snapshot.body

    def remember_owner(self, run_id: str, team_id: str) -> None:
        with self._lock:
            self._owners[run_id] = team_id
            self._owners.move_to_end(run_id)
            while len(self._owners) > MAX_RUNS * 4:
                self._owners.popitem(last=False)

    def put(self, run_id: str, key: Hashable, body: bytes, version: Hashable) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            entries = self._runs.setdefault(run_id, {})
            entries[key] = Snapshot(body, version, time.monotonic() + self.ttl)
            self._runs.move_to_end(run_id)
            while len(self._runs) > MAX_RUNS:
                self._runs.popitem(last=False)

    def drop(self, run_id: str) -> None:
        """Forgets every answer about the run (this process changed its state)."""
        with self._lock:
            self._runs.pop(run_id, None)
