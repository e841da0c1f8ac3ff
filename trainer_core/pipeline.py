"""Runs a whole run spec: its stages in order, resume after a crash, and the final exports."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from trainer_core.checkpoint import (
    complete_checkpoints,
    export_adapter,
    export_merged,
    latest_complete_checkpoint,
    load_trainable_weights,
    read_manifest,
    stage_dir,
    stage_finished,
)
from trainer_core.config import METHOD_FORMATS, FullAdapter, RunSpec, StageBase
from trainer_core.data.mixture import build_mixture, load_records
from trainer_core.distributed import SINGLE, Ranks, agree, barrier, shard_model
from trainer_core.errors import TrainingDataError
from trainer_core.graders.scoring import GraderRuntime, needs_sandbox
from trainer_core.loop import CheckpointPolicy, train_stage
from trainer_core.methods import build_method
from trainer_core.methods.base import RECORD_FORMAT_KEY, StageContext
from trainer_core.model_folders import ModelFolders, folder_problems
from trainer_core.modeling import (
    ReferencePolicy,
    choose_device,
    load_policy,
    load_tokenizer,
    save_policy_weights,
    set_gradient_checkpointing,
)
from trainer_core.reporting import Reporter
from trainer_core.reward_models import export_reward_model, head_from_checkpoint


@dataclass
class PipelineResult:
    """How a run ended; ``exports`` maps "adapter"/"merged" to folders (empty when stopped)."""

    status: Literal["succeeded", "stopped"]
    exports: dict[str, Path] = field(default_factory=dict)
    final_metrics: dict[str, float] = field(default_factory=dict)


def seed_everything(seed: int, *parts: int) -> None:
    """Seeds python, numpy and torch (all devices) from a run seed and sub-stream numbers."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    value = int.from_bytes(digest[:4], "little")
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


class _Datasets:
    """Loads each dataset once per run and tags every record with its format."""

    def __init__(self, paths: dict[str, Path], formats: dict[str, str]) -> None:
        self.paths, self.formats = paths, formats
        self._cache: dict[str, list[dict[str, Any]]] = {}

    def records(self, dataset_id: str, allowed: Sequence[str], where: str) -> list[dict[str, Any]]:
        if dataset_id not in self.paths or dataset_id not in self.formats:
            raise TrainingDataError(f"{where}: dataset {dataset_id!r} was not provided to the trainer")
        fmt = self.formats[dataset_id]
        if fmt not in allowed:
            raise TrainingDataError(
                f"{where}: dataset {dataset_id!r} has format {fmt!r}; this method trains on {list(allowed)}"
            )
        if dataset_id not in self._cache:
            loaded = load_records(self.paths[dataset_id], fmt)
            self._cache[dataset_id] = [{**record, RECORD_FORMAT_KEY: fmt} for record in loaded]
        return self._cache[dataset_id]

    def stage_split(self, stage: StageBase, index: int, seed: int) -> tuple[list[Any], list[Any]]:
        allowed = METHOD_FORMATS[stage.method]
        sources = [
            (self.records(ref.id, allowed, f"stages[{index}].datasets[{j}]"), ref.weight)
            for j, ref in enumerate(stage.datasets)
        ]
        train, held_out = build_mixture(sources, stage.eval_fraction, seed)
        if stage.eval_dataset:
            named = self.records(stage.eval_dataset, allowed, f"stages[{index}].eval_dataset")
            held_out = [*named, *held_out]
        if not train:
            raise TrainingDataError(f"stages[{index}]: the training mixture has no records")
        return list(train), list(held_out)


def _start_dir(spec: RunSpec, base_model_path: Path, work_dir: Path, index: int) -> Path:
    # Full fine-tuning's first stage starts from the base folder itself: no multi-GB copy.
    if index == 0 and isinstance(spec.adapter, FullAdapter):
        return base_model_path
    return stage_dir(work_dir, index) / "start"


def run_pipeline(
    spec: RunSpec,
    *,
    base_model_path: Path,
    dataset_paths: dict[str, Path],
    dataset_formats: dict[str, str],
    work_dir: Path,
    reporter: Reporter,
    device: str = "auto",
    resolve_model: Callable[[str], ModelFolders | Path] | None = None,
    start_adapter: Path | None = None,
    graders: GraderRuntime | None = None,
    rollout_sglang_url: str | None = None,
    ranks: Ranks = SINGLE,
) -> PipelineResult:
    """Returns how the run ended after training every stage of ``spec`` and exporting.

    Each stage starts from the weights the previous one ended with (saved as ``stage-{i}/start``,
    which is also that stage's frozen reference); the first stage starts from ``start_adapter``
    (a LoRA adapter over ``base_model_path``, trained further) when given, else from a fresh
    adapter. Calling again with the same ``work_dir`` after a crash or a stop resumes from the
    latest complete checkpoint (a "resumed" event says where).

    With several ``ranks`` (a torchrun gang; ``device`` is this rank's device) every rank calls this
    with the same arguments and trains an FSDP2-sharded policy; rank 0 writes the stage-start
    folders and the exports (from a whole model rebuilt from the stage's last checkpoint, so they
    are the folders a single process writes). Other ranks should get a reporter that records nothing.
    """
    if start_adapter is not None and isinstance(spec.adapter, FullAdapter):
        raise TrainingDataError("adapter.type 'full' cannot continue a LoRA adapter checkpoint; "
                                "start from its merged export instead")
    if problems := folder_problems(base_model_path):
        # Deterministic: every attempt would fail the same way, so it is not retried.
        raise TrainingDataError(f"base_model: the folder {base_model_path.name} cannot be loaded: "
                                f"{'; '.join(problems)}")
    torch_device = choose_device(device)
    tokenizer = load_tokenizer(base_model_path)
    datasets = _Datasets(dataset_paths, dataset_formats)
    config = spec.model_dump(mode="json")
    checkpoints = CheckpointPolicy(spec.checkpoint_every_steps, spec.keep_checkpoints)

    first_stage, resume_from, previous = 0, None, None
    latest = latest_complete_checkpoint(work_dir)
    if latest is not None:
        index, folder = latest
        step = read_manifest(folder)["step"]
        reporter.on_event("resumed", f"resumed from stage {index} step {step}",
                          {"stage_index": index, "step": step, "checkpoint": str(folder)})
        if stage_finished(folder):
            first_stage = index + 1
            if ranks.is_main:
                previous = _finished_stage_model(spec, base_model_path, work_dir, index, folder, torch_device)
        else:
            first_stage, resume_from = index, folder

    # The policy as the last finished stage ended, whole (on rank 0 only when distributed).
    model: nn.Module | None = previous
    final_metrics: dict[str, float] = {}
    for index in range(first_stage, len(spec.stages)):
        stage = spec.stages[index]
        folder = stage_dir(work_dir, index)
        folder.mkdir(parents=True, exist_ok=True)
        start = _start_dir(spec, base_model_path, work_dir, index)
        resuming = resume_from is not None and index == first_stage
        if not resuming:
            seed_everything(spec.seed, index)
            if ranks.is_main:
                if model is None and start != base_model_path:
                    model = load_policy(base_model_path, spec.adapter, torch_device, start_dir=start_adapter)
                if model is not None:
                    save_policy_weights(model, start)
            barrier(ranks)
        model = load_policy(base_model_path, spec.adapter, torch_device, start_dir=start)
        checkpointing = set_gradient_checkpointing(model, spec.gradient_checkpointing, torch_device)
        if ranks.distributed:
            shard_model(model, torch_device)
        train, held_out = datasets.stage_split(stage, index, spec.seed)
        ctx = StageContext(
            stage=stage, stage_index=index, seed=spec.seed, adapter=spec.adapter, tokenizer=tokenizer,
            train_records=train, eval_records=held_out, device=torch_device, work_dir=folder,
            reference=ReferencePolicy(start, spec.adapter, torch_device), resolve_model=resolve_model,
            graders=graders, rollout_sglang_url=rollout_sglang_url, ranks=ranks,
            # Several ranks stop together at a step's end (agreed); inside a step only one process may.
            should_stop=None if ranks.distributed else reporter.should_stop,
        )
        method = build_method(ctx)
        reporter.on_event("stage_started", f"stage {index} ({stage.method}) started",
                          {"stage_index": index, "method": stage.method, "total_steps": method.total_steps,
                           "gradient_checkpointing": checkpointing})
        reward = getattr(stage, "reward", None)
        if reward is not None and needs_sandbox(reward):
            sandbox = (graders or GraderRuntime()).sandbox()
            reporter.on_event("grader_sandbox", sandbox.describe(),
                              {"stage_index": index, "mode": sandbox.mode})
        outcome = train_stage(
            model, method, stage, stage_index=index, stage_folder=folder, tokenizer=tokenizer,
            checkpoints=checkpoints, reporter=reporter, device=torch_device,
            manifest_config={"run": config, "stage_index": index},
            resume_from=resume_from if resuming else None, ranks=ranks,
        )
        final_metrics = outcome.final_metrics
        if outcome.status == "stopped":
            return PipelineResult("stopped", final_metrics=final_metrics)
        reporter.on_event("stage_finished", f"stage {index} ({stage.method}) finished",
                          {"stage_index": index, "method": stage.method, "total_steps": method.total_steps})
        if ranks.distributed:
            # A sharded policy cannot be saved as a folder: rank 0 rebuilds it whole from the stage's
            # final checkpoint, which every rank has finished writing.
            barrier(ranks)
            model = (_finished_stage_model(spec, base_model_path, work_dir, index,
                                           complete_checkpoints(folder)[-1], torch_device)
                     if ranks.is_main else None)
        if agree(reporter.should_stop(), ranks, torch_device) and index + 1 < len(spec.stages):
            return PipelineResult("stopped", final_metrics=final_metrics)

    if not ranks.is_main:
        return PipelineResult("succeeded", final_metrics=final_metrics)
    assert model is not None, "a finished run always has a final model"
    last = len(spec.stages) - 1
    final_checkpoint = latest_complete_checkpoint(work_dir)[1]
    step = read_manifest(final_checkpoint)["step"]
    exports: dict[str, Path] = {}
    for kind in spec.export:
        out_dir = work_dir / "export" / kind
        if kind == "adapter":
            info = export_adapter(model, tokenizer, out_dir, stage_index=last, step=step, config=config)
        elif kind == "reward_model":
            info = export_reward_model(model, head_from_checkpoint(final_checkpoint, model), tokenizer,
                                       out_dir, base_model_dir=base_model_path, stage_index=last, step=step,
                                       config=config)
        else:
            info = export_merged(model, tokenizer, out_dir, base_model_dir=base_model_path,
                                 stage_index=last, step=step, config=config)
        reporter.on_checkpoint(info)
        exports[kind] = info.path
    return PipelineResult("succeeded", exports=exports, final_metrics=final_metrics)


def _finished_stage_model(
    spec: RunSpec, base_model_path: Path, work_dir: Path, index: int, checkpoint: Path, device: torch.device
) -> nn.Module:
    """Returns the policy as stage ``index`` ended, rebuilt from its start weights and final checkpoint."""
    model = load_policy(base_model_path, spec.adapter, device,
                        start_dir=_start_dir(spec, base_model_path, work_dir, index))
    load_trainable_weights(checkpoint, model)
    return model
