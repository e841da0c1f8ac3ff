"""Which weights a request's `model` names: a base model, a checkpoint id, or a readable alias.

Aliases name a run's exported checkpoint: `RUN:stage-I:step-N` (`I` is the stage index as in
`run.stages[].index`), or just `RUN` for the run's latest export; `RUN` is the run's name (the
most recent run with that name) or its id, and `:adapter` / `:merged` at the end picks the kind
when both were exported (adapter by default). Another team's checkpoints do not exist here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Checkpoint, Run, Team
from app.errors import Unprocessable
from app.inference.types import ModelKind, ResolvedModel
from app.services.fine_tuned_models import checkpoint_for_model_name
from app.services.models import base_model_dir, finished_checkpoint, model_not_found
from app.settings import Settings
from app.storage import LocalBlobStore
from trainer_core.config import LoraAdapter, RunSpec

_ALIAS = re.compile(
    r"^(?P<run>[^:]+?)(?::stage-(?P<stage>\d+))?(?::step-(?P<step>\d+))?(?::(?P<kind>adapter|merged))?$"
)
_EXPORT_KINDS = ("adapter", "merged")


@dataclass(frozen=True)
class Alias:
    run: str
    stage: int | None = None
    step: int | None = None
    kind: ModelKind | None = None


def parse_alias(name: str) -> Alias | None:
    """Returns the parts of `RUN[:stage-I][:step-N][:adapter|:merged]`, or None if it is not one."""
    match = _ALIAS.match(name)
    if match is None:
        return None
    stage, step = match["stage"], match["step"]
    return Alias(
        run=match["run"],
        stage=int(stage) if stage is not None else None,
        step=int(step) if step is not None else None,
        kind=match["kind"],  # type: ignore[arg-type]
    )


def _checkpoint_for_alias(session: Session, team: Team, alias: Alias) -> Checkpoint | None:
    run = session.scalar(select(Run).where(Run.team_id == team.id, Run.id == alias.run))
    if run is None:
        run = session.scalar(
            select(Run).where(Run.team_id == team.id, Run.name == alias.run).order_by(Run.created_at.desc())
        )
    if run is None:
        return None
    query = select(Checkpoint).where(
        Checkpoint.run_id == run.id,
        Checkpoint.team_id == team.id,
        Checkpoint.kind.in_([alias.kind] if alias.kind else _EXPORT_KINDS),
        Checkpoint.deleted_at.is_(None),
    )
    if alias.stage is not None:
        query = query.where(Checkpoint.stage_index == alias.stage)
    if alias.step is not None:
        query = query.where(Checkpoint.step == alias.step)
    # Latest stage and step first; at equal position the adapter ("adapter" < "merged") wins.
    query = query.order_by(Checkpoint.stage_index.desc(), Checkpoint.step.desc(), Checkpoint.kind)
    return session.scalars(query).first()


def _base_of_run(session: Session, settings: Settings, store: LocalBlobStore, team: Team, run: Run) -> Path:
    """Returns the folder a run's adapter applies to: a base model, or a merged checkpoint it started from.

    A run that started from an adapter checkpoint trained that adapter further, so its own adapter
    applies to the same folder as its parent's.
    """
    folder = base_model_dir(settings, run.base_model)
    if folder is not None:
        return folder
    parent = finished_checkpoint(session, team, run.base_model)
    if parent is not None and parent.kind == "merged":
        return store.path_for(parent.blob_prefix)
    parent_run = session.get(Run, parent.run_id) if parent is not None else None
    if parent_run is not None:
        return _base_of_run(session, settings, store, team, parent_run)
    raise Unprocessable(
        f"run {run.id} trained on {run.base_model!r}, which is no longer a base model or checkpoint "
        "of this server; serve its merged export instead",
        code="model_base_missing",
        param="model",
    )


def find_model(
    session: Session, settings: Settings, store: LocalBlobStore, team: Team, name: str
) -> ResolvedModel | None:
    """Returns the folders behind `name` for `team` (base model, checkpoint id or alias), or None."""
    folder = base_model_dir(settings, name)
    if folder is not None:
        return ResolvedModel(id=name, kind="base", base_model=name, base_path=folder)
    if name.startswith("ft:"):
        return _find_fine_tuned(session, settings, store, team, name)
    checkpoint = finished_checkpoint(session, team, name)
    if checkpoint is None and not name.startswith("ckpt_"):
        alias = parse_alias(name)
        checkpoint = _checkpoint_for_alias(session, team, alias) if alias else None
    run = session.get(Run, checkpoint.run_id) if checkpoint is not None else None
    if checkpoint is None or run is None:
        return None
    return ResolvedModel(
        id=checkpoint.id,
        kind=checkpoint.kind,  # type: ignore[arg-type]
        base_model=run.base_model,
        base_path=_base_of_run(session, settings, store, team, run),
        checkpoint_path=store.path_for(checkpoint.blob_prefix),
    )


def _find_fine_tuned(
    session: Session, settings: Settings, store: LocalBlobStore, team: Team, name: str
) -> ResolvedModel | None:
    """Returns the weights of a fine-tuning job's model name (`ft:…`, `ft:…:ckpt-step-N`), or None.

    An intermediate step is a resume checkpoint; it is served through a PEFT adapter folder
    written from it on first use (under `served/<checkpoint id>` in the blob store).
    """
    checkpoint = checkpoint_for_model_name(session, team, name)
    run = session.get(Run, checkpoint.run_id) if checkpoint is not None else None
    if checkpoint is None or run is None:
        return None
    base_path = _base_of_run(session, settings, store, team, run)
    path = store.path_for(checkpoint.blob_prefix)
    if checkpoint.kind == "resume":
        from trainer_core.checkpoint import adapter_from_resume_checkpoint

        adapter = RunSpec.model_validate(run.spec).adapter
        if not isinstance(adapter, LoraAdapter):
            raise Unprocessable(f"model {name!r} is a full fine-tuning step; only LoRA steps are served",
                                code="model_not_servable", param="model")
        path = adapter_from_resume_checkpoint(path, store.path_for(f"served/{checkpoint.id}"),
                                              base_model_dir=base_path, adapter=adapter)
    return ResolvedModel(id=checkpoint.id, kind="adapter", base_model=run.base_model, base_path=base_path,
                         checkpoint_path=path)


def resolve_model(
    session: Session, settings: Settings, store: LocalBlobStore, team: Team, name: str, *,
    param: str = "model", status: int = 404,
) -> ResolvedModel:
    """Returns the folders behind `name`; raises model_not_found (404, or `status`) listing what exists."""
    resolved = find_model(session, settings, store, team, name)
    if resolved is None:
        error = model_not_found(settings, session, team, name, param)
        error.status_code = status
        raise error
    return resolved
