"""Teams and API keys: keys are `ty_<random>`, stored as sha256 only and shown once."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import ApiKey, Team
from app.errors import Unauthorized
from app.ids import new_id

KEY_PREFIX = "ty_"
DEFAULT_TEAM = "default"


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


def team_for_key(session: Session, key: str | None) -> Team:
    """Returns the team of an API key; raises Unauthorized for a missing, wrong or revoked key."""
    if not key:
        raise Unauthorized("missing API key: send `Authorization: Bearer <key>`", code="missing_api_key")
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)))
    team = session.get(Team, row.team_id) if row is not None else None
    if team is None:
        raise Unauthorized("invalid API key")
    return team
