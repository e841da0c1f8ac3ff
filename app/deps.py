"""Request dependencies as typed aliases: a handler's signature says what it needs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Team
from app.services import auth
from app.settings import Settings
from app.storage import LocalBlobStore


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    factory: sessionmaker[Session] = request.app.state.sessions
    with factory() as session:
        yield session


def get_store(request: Request) -> LocalBlobStore:
    return request.app.state.store


def get_celery(request: Request) -> Celery:
    return request.app.state.celery


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[LocalBlobStore, Depends(get_store)]
CeleryDep = Annotated[Celery, Depends(get_celery)]


bearer = HTTPBearer(auto_error=False, description="an API key `ty_…` (tuneyard keys create --team NAME)")


def get_current_team(
    session: SessionDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Team:
    """Returns the team of the Bearer key (or the default team when auth is switched off)."""
    if not settings.auth_enabled:
        team = auth.get_or_create_team(session, auth.DEFAULT_TEAM)
    else:
        team = auth.team_for_key(session, credentials.credentials if credentials else None)
    # Ending the transaction returns the connection to the pool before the handler's own thread
    # hop: a request must never hold a connection while it waits for a thread (see app.main).
    session.commit()
    return team


CurrentTeam = Annotated[Team, Depends(get_current_team)]
