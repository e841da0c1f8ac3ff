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
from app.errors import NotFound, Unprocessable
from app.inference.types import ModelKind, ResolvedModel
from app.services.fine_tuning_objects import checkpoint_for_model_name
from app.services.models import base_model_dir, finished_checkpoint
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


def _not_found(name: str, why: str = "") -> NotFound:
    return NotFound(
        f"model {name!r} does not exist{why}: use a base model or one of your finished checkpoints "
        "(GET /v1/models) or an alias RUN:stage-I:step-N",
        code="model_not_found",
        param="model",
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
    """Returns the folder a run trained on: a base model, or a merged checkpoint it started from."""
    folder = base_model_dir(settings, run.base_model)
    if folder is not None:
        return folder
    parent = finished_checkpoint(session, team, run.base_model)
    if parent is not None and parent.kind == "merged":
        return store.path_for(parent.blob_prefix)
    raise Unprocessable(
        f"run {run.id} trained on {run.base_model!r}, which is no longer a base model or merged checkpoint "
        "of this server; serve its merged export instead",
        code="model_base_missing",
        param="model",
    )


def resolve_model(
    session: Session, settings: Settings, store: LocalBlobStore, team: Team, name: str
) -> ResolvedModel:
    """Returns the folders behind `name` for `team`; raises NotFound (404) for anything else."""
    folder = base_model_dir(settings, name)
    if folder is not None:
        return ResolvedModel(id=name, kind="base", base_model=name, base_path=folder)
    if name.startswith("ft:"):
        return _resolve_fine_tuned(session, settings, store, team, name)
    checkpoint = finished_checkpoint(session, team, name)
    if checkpoint is None and not name.startswith("ckpt_"):
        alias = parse_alias(name)
        checkpoint = _checkpoint_for_alias(session, team, alias) if alias else None
    if checkpoint is None:
        raise _not_found(name)
    run = session.get(Run, checkpoint.run_id)
    if run is None:
        raise _not_found(name, " (its run was deleted)")
    return ResolvedModel(
        id=checkpoint.id,
        kind=checkpoint.kind,  # type: ignore[arg-type]
        base_model=run.base_model,
        base_path=_base_of_run(session, settings, store, team, run),
        checkpoint_path=store.path_for(checkpoint.blob_prefix),
    )


def _resolve_fine_tuned(
    session: Session, settings: Settings, store: LocalBlobStore, team: Team, name: str
) -> ResolvedModel:
    """Returns the weights of a fine-tuning job's model name (`ft:…`, `ft:…:ckpt-step-N`).

    An intermediate step is a resume checkpoint; it is served through a PEFT adapter folder
    written from it on first use (under `served/<checkpoint id>` in the blob store).
    """
    checkpoint = checkpoint_for_model_name(session, team, name)
    run = session.get(Run, checkpoint.run_id) if checkpoint is not None else None
    if checkpoint is None or run is None:
        raise _not_found(name, " (no succeeded fine-tuning job or live checkpoint has that name)")
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
