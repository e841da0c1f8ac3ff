"""Request dependencies as typed aliases: a handler's signature says what it needs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import State

from app.db.models import Team
from app.services import auth
from app.services.snapshots import SnapshotCache
from app.settings import Settings
from app.storage import LocalBlobStore


async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    factory: sessionmaker[Session] = request.app.state.sessions
    with factory() as session:
        yield session


async def get_store(request: Request) -> LocalBlobStore:
    return request.app.state.store


async def get_celery(request: Request) -> Celery:
    return request.app.state.celery


async def get_snapshots(request: Request) -> SnapshotCache:
    return request.app.state.snapshots


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SnapshotsDep = Annotated[SnapshotCache, Depends(get_snapshots)]
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[LocalBlobStore, Depends(get_store)]
CeleryDep = Annotated[Celery, Depends(get_celery)]


bearer = HTTPBearer(auto_error=False, description="an API key `ty_…` (tuneyard keys create --team NAME)")


async def get_current_team(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Team:
    """Returns the team of the Bearer key (or the default team when auth is switched off)."""
    return await team_of(request.app.state, credentials.credentials if credentials else None)


# For the most polled routes (run status, metrics), which call `polled_team` themselves instead of
# depending on CurrentTeam: FastAPI's dependency solving was ~40 % of such a request's CPU. The
# OpenAPI document still shows them as Bearer-authenticated.
BEARER_SECURITY: dict = {"security": [{"HTTPBearer": []}]}


async def polled_team(request: Request) -> Team:
    """Returns the team of the request's Bearer key (what CurrentTeam does, without the dependency)."""
    return await team_of(request.app.state, bearer_key(request.headers.get("authorization", "")))


def bearer_key(authorization: str) -> str | None:
    """Returns the key of an `Authorization: Bearer <key>` header value, None for any other."""
    scheme, _, key = authorization.partition(" ")
    return key.strip() if scheme.lower() == "bearer" else None


async def team_of(state: State, key: str | None) -> Team:
    """Returns the team of an API key; a key seen within `auth_cache_seconds` costs no database
    round trip and no thread hop."""
    sessions: sessionmaker[Session] = state.sessions
    if not state.settings.auth_enabled:
        return await run_in_threadpool(_default_team, sessions)
    cache: auth.KeyCache = state.keys
    if not key:
        raise auth.missing_key()
    entry = await cache.resolve(auth.hash_key(key), lambda: run_in_threadpool(_lookup, sessions, cache, key))
    if cache.touch_due(entry.key_id):
        await run_in_threadpool(_touch, sessions, entry.key_id)
    return entry.team


def _default_team(sessions: sessionmaker[Session]) -> Team:
    with sessions() as session:
        return auth.get_or_create_team(session, auth.DEFAULT_TEAM)


def _lookup(sessions: sessionmaker[Session], cache: auth.KeyCache, key: str | None) -> auth.KeyEntry:
    with sessions() as session:
        return auth.lookup_key(session, cache, key)


def _touch(sessions: sessionmaker[Session], key_id: str) -> None:
    with sessions() as session:
        auth.touch_key(session, key_id)


CurrentTeam = Annotated[Team, Depends(get_current_team)]
