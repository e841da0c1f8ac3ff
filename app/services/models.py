"""Models a team can train from or query: base model folders (checkpoints are added later)."""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Checkpoint, Team
from app.schemas.models import ModelOut
from app.settings import Settings

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def base_model_dir(settings: Settings, name: str) -> Path | None:
    """Returns the folder of a base model (a folder with config.json), or None if there is none."""
    if not _MODEL_NAME.match(name):
        return None
    folder = settings.base_models_dir / name
    return folder if (folder / "config.json").is_file() else None


def base_models(settings: Settings) -> list[ModelOut]:
    root = settings.base_models_dir
    if not root.is_dir():
        return []
    return [
        ModelOut(id=p.name, created=int(p.stat().st_mtime), owned_by="tuneyard", kind="base")
        for p in sorted(root.iterdir())
        if p.is_dir() and (p / "config.json").is_file() and _MODEL_NAME.match(p.name)
    ]


def finished_checkpoint(session: Session, team: Team, checkpoint_id: str) -> Checkpoint | None:
    """Returns the team's exported (adapter or merged) checkpoint with that id, if any."""
    return session.scalar(
        select(Checkpoint).where(
            Checkpoint.id == checkpoint_id,
            Checkpoint.team_id == team.id,
            Checkpoint.kind.in_(("adapter", "merged")),
            Checkpoint.deleted_at.is_(None),
        )
    )


def reward_model_checkpoint(session: Session, team: Team, checkpoint_id: str) -> Checkpoint | None:
    """Returns the team's ``reward_model`` checkpoint with that id (for reward_model graders), if any."""
    return session.scalar(
        select(Checkpoint).where(
            Checkpoint.id == checkpoint_id,
            Checkpoint.team_id == team.id,
            Checkpoint.kind == "reward_model",
            Checkpoint.deleted_at.is_(None),
        )
    )


def finished_checkpoints(session: Session, team: Team) -> list[ModelOut]:
    """Returns the team's exported (adapter or merged) checkpoints, oldest first."""
    rows = session.scalars(
        select(Checkpoint)
        .where(
            Checkpoint.team_id == team.id,
            Checkpoint.kind.in_(("adapter", "merged")),
            Checkpoint.deleted_at.is_(None),
        )
        .order_by(Checkpoint.created_at, Checkpoint.id)
    ).all()
    return [
        ModelOut(id=c.id, created=int(c.created_at.timestamp()), owned_by=team.name, kind=c.kind)  # type: ignore[arg-type]
        for c in rows
    ]


def list_models(session: Session, settings: Settings, team: Team) -> list[ModelOut]:
    """Returns the models the team can use: the server's base models, then its finished checkpoints."""
    return base_models(settings) + finished_checkpoints(session, team)
