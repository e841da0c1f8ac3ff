"""The models a run spec names (its base_model, SAD teachers, reward-model graders): pinned or
checked at submit, turned into folders on the worker.

Any name `GET /v1/models` lists works, and so does a checkpoint alias (`RUN:stage-I:step-N`); at
submit each is pinned to its id, so the run trains on what was named even if the alias later
points elsewhere. A finished adapter checkpoint as `base_model` continues that adapter (the run
takes the parent's adapter settings); a merged one is a new base. What cannot work is refused
here with a 422 naming the field, never after a worker has claimed the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app.db.models import Checkpoint, Run, Team
from app.errors import Unprocessable
from app.inference.resolution import resolve_model
from app.inference.types import ResolvedModel
from app.services.models import reward_model_checkpoint
from app.settings import Settings
from app.storage import LocalBlobStore
from trainer_core.config import Adapter, FullAdapter, LoraAdapter, RunSpec, SADStage, Stage
from trainer_core.grader_config import MultiGrader, RewardModelGrader
from trainer_core.model_folders import folder_problems, linear_modules, missing_target_modules


def _parent_adapter(session: Session, checkpoint_id: str) -> LoraAdapter:
    checkpoint = session.get(Checkpoint, checkpoint_id)
    run = session.get(Run, checkpoint.run_id) if checkpoint is not None else None
    assert run is not None, "a resolved checkpoint has its run"
    return LoraAdapter.model_validate(run.spec["adapter"])


def _vocabulary(folder: Path) -> Any:
    """Returns a comparable form of a folder's vocabulary (token → id), or None when it cannot tell."""
    tokenizer = folder / "tokenizer.json"
    if tokenizer.is_file():
        data = json.loads(tokenizer.read_text())
        added = sorted((t["id"], t["content"]) for t in data.get("added_tokens", []))
        return data.get("model", {}).get("vocab"), added
    vocab = folder / "vocab.json"
    return json.loads(vocab.read_text()) if vocab.is_file() else None


def _check_teacher(student: ResolvedModel, teacher: ResolvedModel, param: str) -> None:
    if teacher.weights_path == student.weights_path:
        return
    ours, theirs = _vocabulary(student.weights_path), _vocabulary(teacher.weights_path)
    if ours is not None and theirs is not None and ours != theirs:
        raise Unprocessable(
            f"{param}: teacher {teacher.id!r} has a different tokenizer than base_model {student.id!r}; "
            "distillation compares token ids, so pick a teacher of the same model family",
            code="teacher_vocabulary_mismatch", param=param)


def _check_loadable(base: ResolvedModel, adapter: Adapter) -> None:
    """Raises 422 when the base model's folder cannot load or lacks a LoRA target module.

    Both would otherwise fail only on the worker, attempt after attempt.
    """
    # Checkpoints are this service's own sealed exports; base models are folders an operator placed.
    problems = folder_problems(base.weights_path) if base.kind == "base" else []
    if problems:
        raise Unprocessable(
            f"base_model: {base.id!r} cannot be loaded: {'; '.join(problems)}. Pick another base model "
            "(GET /v1/models) or ask the operator to fix the folder",
            code="model_unloadable", param="base_model")
    if not isinstance(adapter, LoraAdapter) or not isinstance(adapter.target_modules, list):
        return
    modules = linear_modules(base.weights_path)
    missing = missing_target_modules(adapter.target_modules, modules) if modules is not None else []
    if missing:
        index = adapter.target_modules.index(missing[0])
        names = sorted({m.rsplit(".", 1)[-1] for m in modules or ()})
        raise Unprocessable(
            f"adapter.target_modules[{index}]: base_model {base.id!r} has no module {missing[0]!r}; its "
            f"linear modules are {', '.join(names[:30])}, or use 'all-linear'",
            code="target_module_not_found", param=f"adapter.target_modules[{index}]")


def resolve_spec_models(session: Session, settings: Settings, team: Team, spec: RunSpec) -> RunSpec:
    """Returns the spec with base_model and teacher models pinned to ids; 422 for what cannot work."""
    store = LocalBlobStore(settings.storage_dir)
    base = resolve_model(session, settings, store, team, spec.base_model, param="base_model", status=422)
    update: dict[str, Any] = {"base_model": base.id}
    if base.kind == "adapter":
        parent = _parent_adapter(session, base.id)
        if isinstance(spec.adapter, FullAdapter):
            raise Unprocessable(
                f"adapter.type: base_model {base.id} is a LoRA adapter, which full fine-tuning cannot "
                "continue; use its run's merged export as base_model, or leave adapter out to train the "
                "adapter further",
                code="adapter_mismatch", param="adapter.type")
        if "adapter" in spec.model_fields_set and spec.adapter != parent:
            raise Unprocessable(
                f"adapter: base_model {base.id} is a LoRA adapter with {parent.model_dump(mode='json')}; "
                "training continues that adapter, so leave adapter out (or give exactly those settings)",
                code="adapter_mismatch", param="adapter")
        update["adapter"] = parent
    _check_loadable(base, update.get("adapter", spec.adapter))
    stages = list(spec.stages)
    for i, stage in enumerate(stages):
        if isinstance(stage, SADStage) and stage.teacher.source == "model" and stage.divergence != "ce":
            param = f"stages[{i}].teacher.model"
            assert stage.teacher.model is not None
            teacher = resolve_model(session, settings, store, team, stage.teacher.model, param=param,
                                    status=422)
            _check_teacher(base, teacher, param)
            pinned = stage.teacher.model_copy(update={"model": teacher.id})
            stages[i] = stage.model_copy(update={"teacher": pinned})
        _check_reward_models(session, team, stage, f"stages[{i}].reward")
    return spec.model_copy(update={**update, "stages": stages})


def _check_reward_models(session: Session, team: Team, stage: Stage, param: str) -> None:
    """Raises 422 when a reward_model grader of the stage names no reward_model checkpoint of the team."""
    reward = getattr(stage, "reward", None)
    if reward is None:
        return
    graders = reward.graders.items() if isinstance(reward, MultiGrader) else [(None, reward)]
    for key, grader in graders:
        if not isinstance(grader, RewardModelGrader):
            continue
        if reward_model_checkpoint(session, team, grader.model) is None:
            where = f"{param}.model" if key is None else f"{param}.graders.{key}.model"
            raise Unprocessable(
                f"{where}: {grader.model!r} is not a finished reward_model checkpoint of the team; train "
                'one with a run whose only stage is {"method": "reward_model"}',
                code="model_not_found", param=where)

