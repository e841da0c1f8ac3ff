"""Models a team can train from or query: base model folders (yours too) and finished checkpoints.

A base model is a Hugging Face folder under the base-models dir, named by its path there:
`tiny-llama`, or `Qwen/Qwen2.5-0.5B-Instruct` for a nested `Qwen/Qwen2.5-0.5B-Instruct/` folder
(the Hub's own naming). `tuneyard models add` checks a folder and links it in.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Checkpoint, Team
from app.errors import Unprocessable
from app.ids import is_id
from app.schemas.models import ModelOut
from app.settings import Settings
from trainer_core.model_folders import folder_problems, safetensors_header, weight_files

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"
# One optional `organisation/` level, as on the Hub; every part starts with a letter or digit, so
# no part is `..` and a name never leaves the base-models dir.
_MODEL_NAME = re.compile(rf"^{_PART}(?:/{_PART})?$")


def base_model_dir(settings: Settings, name: str) -> Path | None:
    """Returns the folder of a base model (a folder with config.json), or None if there is none."""
    if not _MODEL_NAME.match(name):
        return None
    folder = settings.base_models_dir / name
    return folder if (folder / "config.json").is_file() else None


def _base_model_names(root: Path) -> list[str]:
    """Returns the base model names under root: `name/` folders and `org/name/` folders, sorted."""
    names: list[str] = []
    if not root.is_dir():
        return names
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or not re.fullmatch(_PART, entry.name):
            continue
        if (entry / "config.json").is_file():
            names.append(entry.name)
            continue
        names.extend(f"{entry.name}/{sub.name}" for sub in sorted(entry.iterdir())
                     if sub.is_dir() and re.fullmatch(_PART, sub.name) and (sub / "config.json").is_file())
    return names


@dataclass(frozen=True)
class FolderFacts:
    """What a model folder holds: its architecture, parameter count and weight bytes."""

    architecture: str | None
    parameters: int | None
    size_bytes: int


def _safetensors_parameters(path: Path) -> int:
    header = safetensors_header(path)
    total = 0
    for name, tensor in header.items():
        if name != "__metadata__":
            count = 1
            for dim in tensor["shape"]:
                count *= dim
            total += count
    return total


@lru_cache(maxsize=256)
def _folder_facts(folder: Path, mtime_ns: int) -> FolderFacts:
    # Keyed by the folder's mtime: a model replaced in place is read again.
    config = json.loads((folder / "config.json").read_text())
    architectures = config.get("architectures") or []
    architecture = architectures[0] if architectures else config.get("model_type")
    weights = weight_files(folder)
    safetensors = [p for p in weights if p.suffix == ".safetensors"]
    parameters = sum(_safetensors_parameters(p) for p in safetensors) if safetensors else None
    return FolderFacts(architecture, parameters, sum(p.stat().st_size for p in weights))


def folder_facts(folder: Path) -> FolderFacts:
    """Returns a model folder's architecture, parameter count (from safetensors headers) and size."""
    return _folder_facts(folder.resolve(), folder.resolve().stat().st_mtime_ns)


def base_models(settings: Settings) -> list[ModelOut]:
    """Returns the server's base models with their architecture and size."""
    out = []
    for name in _base_model_names(settings.base_models_dir):
        folder = settings.base_models_dir / name
        try:
            facts = folder_facts(folder)
        except (OSError, ValueError, KeyError, struct.error):  # a broken folder is listed, not fatal
            facts = FolderFacts(None, None, 0)
        out.append(ModelOut(id=name, created=int(folder.stat().st_mtime), owned_by="tuneyard", kind="base",
                            architecture=facts.architecture, parameters=facts.parameters,
                            size_bytes=facts.size_bytes))
    return out


def model_not_found(settings: Settings, session: Session, team: Team, name: str, param: str) -> Unprocessable:
    """Returns the 422 for a model name that is neither a base model nor a checkpoint, listing both."""
    names = _base_model_names(settings.base_models_dir)
    checkpoints = [m.id for m in finished_checkpoints(session, team)][-5:]
    have = ", ".join(names) or "none"
    hint = f"; your latest checkpoints: {', '.join(checkpoints)}" if checkpoints else ""
    return Unprocessable(
        f"{param}: {name!r} is neither a base model of this server nor a finished checkpoint of your team. "
        f"Base models are the folders in {settings.base_models_dir} (here: {have}){hint}. "
        "Add your own with `tuneyard models add PATH`",
        code="model_not_found", param=param,
    )


def finished_checkpoint(session: Session, team: Team, checkpoint_id: str) -> Checkpoint | None:
    """Returns the team's exported (adapter or merged) checkpoint with that id, if any."""
    if not is_id(checkpoint_id, "ckpt"):
        return None
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
        ModelOut(id=c.id, created=int(c.created_at.timestamp()), owned_by=team.name, kind=c.kind,  # type: ignore[arg-type]
                 run_id=c.run_id)
        for c in rows
    ]


def list_models(session: Session, settings: Settings, team: Team) -> list[ModelOut]:
    """Returns the models the team can use: the server's base models, then its finished checkpoints."""
    return base_models(settings) + finished_checkpoints(session, team)


# ---------------------------------------------------------------- bringing your own model


@dataclass
class FolderCheck:
    """What `check_model_folder` found: problems stop registration, warnings do not."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    try:
        return bool(config.is_file() and json.loads(config.read_text()).get("chat_template"))
    except ValueError:
        return False


def check_model_folder(folder: Path) -> FolderCheck:
    """Returns what keeps a folder from training and serving: config, weights, tokenizer, chat template."""
    check = FolderCheck(problems=folder_problems(folder))
    if not folder.is_dir():
        return check
    if (folder / "adapter_config.json").is_file():
        check.problems.append("this is a PEFT adapter, not a full model: train from it with "
                              "base_model set to its checkpoint id, or merge it first")
    if not _has_chat_template(folder):
        check.warnings.append("no chat template: `messages` datasets and /v1/chat/completions need one "
                              "(prompt/completion and text datasets still train)")
    return check


def register_model(settings: Settings, folder: Path, name: str, *, copy: bool = False) -> Path:
    """Returns the base-models path now serving `folder` as `name` (a symlink, or a copy with copy=True).

    Raises ValueError naming what is wrong: an invalid or taken name, or a folder that fails the check.
    """
    if not _MODEL_NAME.match(name):
        raise ValueError(f"model name {name!r} must be NAME or ORG/NAME (letters, digits, '.', '_', '-')")
    check = check_model_folder(folder)
    if check.problems:
        raise ValueError(f"{folder} cannot be used as a base model: " + "; ".join(check.problems))
    target = settings.base_models_dir / name
    if target.exists() or target.is_symlink():
        raise ValueError(f"a base model named {name!r} exists already ({target}); pick another --name")
    target.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copytree(folder, target)
    else:
        target.symlink_to(folder.resolve(), target_is_directory=True)
    return target
