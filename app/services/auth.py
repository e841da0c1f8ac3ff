"""Teams and API keys: keys are `ty_<random>`, stored as sha256 only and shown once.

The API resolves a key to its team once per `auth_cache_seconds` per process (`KeyCache`), not
on every request: a revoked key keeps working at most that long in another process (at once in
the process that revoked it). `last_used_at` is written at most once a minute per key.

Under many concurrent requests with one key (a dashboard's pollers), an entry that expired would
send every request in flight to the database at once — measured as the p99 of run-status polling
(100 lookups queued on the thread pool every TTL). So one lookup per key runs at a time (the
others await it), and a key used in the second half of its entry's life is looked up again in
the background while the entry still answers: a busy key never expires under its users. The
entry's deadline is never extended without a lookup, so revocation still shows within the TTL.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import ApiKey, Team, utcnow
from app.errors import NotFound, Unauthorized
from app.ids import new_id

KEY_PREFIX = "ty_"
DEFAULT_TEAM = "default"
TOUCH_EVERY_S = 60.0  # last_used_at is a "roughly when" for people; a write per request is waste

log = logging.getLogger(__name__)


def hash_key(key: str) -> str:
    """Returns the sha256 hex digest under which a key is stored."""
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_team(session: Session, name: str) -> Team:
    """Returns the team called `name`, creating (and committing) it if needed."""
    team = session.scalar(select(Team).where(Team.name == name))
    if team is not None:
        return team
    team = Team(id=new_id("team"), name=name)
    session.add(team)
    try:
        session.commit()
    except IntegrityError:  # created concurrently by another process
        session.rollback()
        team = session.scalar(select(Team).where(Team.name == name))
        assert team is not None
    return team


def create_api_key(session: Session, team_name: str, key_name: str = "") -> tuple[Team, str]:
    """Returns (team, plaintext key) for a new key of the team (team created if needed).

    The plaintext is never stored: show it once.
    """
    team = get_or_create_team(session, team_name)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(id=new_id("key"), team_id=team.id, name=key_name, key_hash=hash_key(key),
                       prefix=key[:10]))
    session.commit()
    return team, key


def team_count(session: Session) -> int:
    return len(session.scalars(select(Team.id).limit(2)).all())


def list_keys(session: Session, team_id: str | None = None) -> list[tuple[ApiKey, str]]:
    """Returns (key, team name) of every key, or of one team's, oldest first (revoked ones too)."""
    stmt = select(ApiKey, Team.name).join(Team, Team.id == ApiKey.team_id).order_by(ApiKey.created_at,
                                                                                   ApiKey.id)
    if team_id is not None:
        stmt = stmt.where(ApiKey.team_id == team_id)
    return [(key, name) for key, name in session.execute(stmt).all()]


def revoke_key(session: Session, key_id: str, team_id: str | None = None) -> ApiKey:
    """Returns the key after revoking it (revoking twice keeps the first time); 404 for an unknown
    key or, with `team_id`, another team's. Commits."""
    key = session.get(ApiKey, key_id)
    if key is None or (team_id is not None and key.team_id != team_id):
        raise NotFound(f"no API key {key_id!r}", param="key_id")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.commit()
    return key


@dataclass(frozen=True)
class KeyEntry:
    key_id: str
    team: Team  # transient (in no session): handlers read its id and name, so it is shared
    expires: float  # time.monotonic() after which the key is looked up again
    refresh_after: float  # time.monotonic() after which a use looks it up again in the background


class KeyCache:
    """API key hash → its team, for `ttl` seconds; and when each key's last use was last written."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[str, KeyEntry] = {}
        self._touched: dict[str, float] = {}
        self._lock = threading.Lock()
        self._flights: dict[str, asyncio.Future[KeyEntry]] = {}  # key hash → its lookup in flight

    async def resolve(self, key_hash: str, lookup: Callable[[], Awaitable[KeyEntry]]) -> KeyEntry:
        """Returns the key's entry: cached, or from `lookup` (which raises Unauthorized for a bad key
        and puts a good one here) — one lookup per key at a time, whoever else needs it awaits it.
        A cached entry past half its life starts a background lookup and is returned meanwhile."""
        entry = self.get(key_hash)
        if entry is not None:
            if entry.refresh_after < time.monotonic() and key_hash not in self._flights:
                self._start(key_hash, lookup)
            return entry
        flight = self._flights.get(key_hash) or self._start(key_hash, lookup)
        # shielded: a client that goes away does not cancel the lookup the others wait for
        return await asyncio.shield(flight)

    def _start(self, key_hash: str, lookup: Callable[[], Awaitable[KeyEntry]]) -> asyncio.Future[KeyEntry]:
        flight = asyncio.ensure_future(lookup())
        self._flights[key_hash] = flight
        flight.add_done_callback(lambda done: self._landed(key_hash, done))
        return flight

    def _landed(self, key_hash: str, done: asyncio.Future[KeyEntry]) -> None:
        self._flights.pop(key_hash, None)
        if done.cancelled():
            return
        error = done.exception()  # retrieved here; raised to whoever awaited it
        if isinstance(error, Unauthorized):
            self.drop(key_hash)  # revoked since it was cached (a background lookup found out)
        elif error is not None:
            log.warning("API key lookup failed: %s", error)  # the entry answers until it expires

    def drop(self, key_hash: str) -> None:
        with self._lock:
            self._entries.pop(key_hash, None)

    def get(self, key_hash: str) -> KeyEntry | None:
        entry = self._entries.get(key_hash)
        if entry is None or entry.expires < time.monotonic():
            return None
        return entry

    def put(self, key_hash: str, key_id: str, team_id: str, team_name: str) -> KeyEntry:
        now = time.monotonic()
        entry = KeyEntry(key_id, Team(id=team_id, name=team_name), now + self.ttl, now + self.ttl / 2)
        if self.ttl > 0:
            with self._lock:
                if len(self._entries) > 10_000:  # bounded: drop what expired
                    now = time.monotonic()
                    self._entries = {h: e for h, e in self._entries.items() if e.expires >= now}
                self._entries[key_hash] = entry
        return entry

    def forget(self, key_id: str) -> None:
        """Drops a key at once (this process revoked it)."""
        with self._lock:
            self._entries = {h: e for h, e in self._entries.items() if e.key_id != key_id}

    def touch_due(self, key_id: str) -> bool:
        """Returns True (once a minute per key) when the key's `last_used_at` should be written."""
        now = time.monotonic()
        with self._lock:
            if now - self._touched.get(key_id, float("-inf")) < TOUCH_EVERY_S:
                return False
            self._touched[key_id] = now
            return True


def missing_key() -> Unauthorized:
    return Unauthorized("missing API key: send `Authorization: Bearer <key>`", code="missing_api_key")


def lookup_key(session: Session, cache: KeyCache, key: str | None) -> KeyEntry:
    """Returns the key's cache entry after reading it from the database; raises Unauthorized for a
    missing, wrong or revoked key."""
    if not key:
        raise missing_key()
    digest = hash_key(key)
    row = session.execute(
        select(ApiKey.id, Team.id, Team.name).join(Team, Team.id == ApiKey.team_id)
        .where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
    ).one_or_none()
    if row is None:
        raise Unauthorized("invalid API key")
    return cache.put(digest, *row)


def touch_key(session: Session, key_id: str, now: datetime | None = None) -> None:
    """Writes the key's `last_used_at` unless another process wrote it within the minute. Commits."""
    now = now or utcnow()
    session.execute(update(ApiKey).where(
        ApiKey.id == key_id,
        or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < now - timedelta(seconds=TOUCH_EVERY_S)))
        .values(last_used_at=now).execution_options(synchronize_session=False))
    session.commit()
