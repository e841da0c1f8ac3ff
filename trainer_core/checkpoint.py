"""Checkpoint folders: resume state, retention, and adapter/merged exports.

Layout under a run's work_dir::

    stage-{i}/start/                      policy weights the stage began from (its DPO/RL reference)
    stage-{i}/checkpoint-{step:08d}/      resume state after optimizer step `step`
        trainable.safetensors             trainable weights (LoRA, or every weight for full FT)
        optimizer.pt  rng.pt  method_state.pt  trainer_state.json
        rng-rank{r}.pt                    RNG of rank r > 0 (runs on several processes)
        modules.pt                        a method's extra trainable modules (PPO value head), if any
        manifest.json                     written last: config, stage, step, versions, files+sha256
    export/adapter/  export/merged/       final exports, each with its manifest.json

Every folder is written under a ``.tmp`` name, fsync'd, given its manifest last, and renamed in
one step, so a folder with a final name and a manifest is complete; anything else is ignored and
cleaned up.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import peft
import torch
import transformers
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, PreTrainedTokenizerBase

from trainer_core.config import LoraAdapter
from trainer_core.distributed import SINGLE, Ranks, barrier, copy_full_into, full_tensor
from trainer_core.modeling import (
    POLICY_ADAPTER,
    dequantized_weights,
    load_base_model,
    load_policy,
    trainable_parameters,
)
from trainer_core.reporting import CheckpointInfo, CheckpointKind, FileEntry
from trainer_core.staging import staged_folder

MANIFEST = "manifest.json"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d{8})$")
_STAGE_NAME = re.compile(r"^stage-(\d+)$")


def stage_dir(work_dir: Path, stage_index: int) -> Path:
    """Returns the folder of one stage's checkpoints."""
    return work_dir / f"stage-{stage_index}"


# ---------------------------------------------------------------- atomic folders


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_entries(folder: Path) -> list[FileEntry]:
    return [
        FileEntry(path=p.relative_to(folder).as_posix(), size=p.stat().st_size, sha256=_sha256(p))
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    ]


def _versions() -> dict[str, str]:
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def _finalize(tmp: Path, final: Path, manifest: dict[str, Any]) -> list[FileEntry]:
    """Returns the files of ``tmp`` after sealing it with a manifest and renaming it to ``final``."""
    _fsync_tree(tmp)
    files = _file_entries(tmp)
    manifest = {**manifest, "versions": _versions(), "created_at": time.time(),
                "files": [vars(f) for f in files]}
    with open(tmp / MANIFEST, "w") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return files


def read_manifest(folder: Path) -> dict[str, Any]:
    """Returns the parsed manifest of a complete checkpoint or export folder."""
    return json.loads((folder / MANIFEST).read_text())


# ---------------------------------------------------------------- resume checkpoints


@dataclass(frozen=True)
class ResumeState:
    """What a resume checkpoint restores besides weights and optimizer (already loaded in place)."""

    step: int
    method_state: dict[str, Any]
    trainer_state: dict[str, Any]


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        # numpy's array is stored as a list so the file loads with weights_only=True.
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, ranks: Ranks) -> dict[str, Any]:
    """Returns the whole optimizer state (gathered from every rank's shards; only rank 0 gets it)."""
    if not ranks.distributed:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                          ranks: Ranks) -> None:
    if not ranks.distributed:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def _rng_file(rank: int) -> str:
    return "rng.pt" if rank == 0 else f"rng-rank{rank}.pt"


def save_resume_checkpoint(
    stage_folder: Path,
    stage_index: int,
    step: int,
    *,
    total_steps: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    method_state: dict[str, Any],
    trainer_state: dict[str, Any],
    config: dict[str, Any],
    metrics: dict[str, float],
    modules: Mapping[str, nn.Module] | None = None,
    ranks: Ranks = SINGLE,
) -> CheckpointInfo | None:
    """Returns the info of a complete resume checkpoint written for optimizer step ``step``.

    ``modules``: trainable modules besides the policy (a method's ``trainable_modules``), stored
    by name. With several ranks every rank must call it: the sharded weights and optimizer state
    are gathered to rank 0, which writes the same files a single process writes (plus each rank's
    RNG) and returns the info; the other ranks return None.
    """
    final = stage_folder / f"checkpoint-{step:08d}"
    weights = {name: full_tensor(p.detach()).cpu().contiguous()
               for name, p in trainable_parameters(model).items()}
    optimizer_state = _optimizer_state(model, optimizer, ranks)
    manifest = {"kind": "resume", "stage_index": stage_index, "step": step, "total_steps": total_steps,
                "world_size": ranks.world_size, "config": config, "metrics": metrics}
    if not ranks.is_main:
        barrier(ranks)  # rank 0 created the folder
        torch.save(_rng_state(), final.with_name(final.name + ".tmp") / _rng_file(ranks.rank))
        barrier(ranks)  # every rank's RNG is in: rank 0 seals the folder
        barrier(ranks)  # sealed
        return None
    with staged_folder(final) as tmp:
        barrier(ranks)
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(_rng_state(), tmp / _rng_file(ranks.rank))
        torch.save(method_state, tmp / "method_state.pt")
        if modules:
            torch.save({name: module.state_dict() for name, module in modules.items()}, tmp / "modules.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, sort_keys=True))
        barrier(ranks)
        files = _finalize(tmp, final, manifest)
    barrier(ranks)
    return CheckpointInfo(stage_index=stage_index, step=step, kind="resume", path=final, files=files,
                          metrics=dict(metrics))


def load_trainable_weights(folder: Path, model: nn.Module) -> None:
    """Copies a resume checkpoint's trainable weights into ``model`` (names must match exactly).

    A sharded model keeps its own shard of each weight.
    """
    weights = load_file(str(folder / "trainable.safetensors"))
    params = trainable_parameters(model)
    if set(weights) != set(params):
        raise ValueError(f"checkpoint {folder} does not match the model's trainable weights")
    with torch.no_grad():
        for name, value in weights.items():
            copy_full_into(params[name], value)


def stage_finished(folder: Path) -> bool:
    """Returns whether a resume checkpoint was written after its stage's last step."""
    manifest = read_manifest(folder)
    return int(manifest["step"]) >= int(manifest["total_steps"])


def load_resume_checkpoint(
    folder: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
    modules: Mapping[str, nn.Module] | None = None, ranks: Ranks = SINGLE,
) -> ResumeState:
    """Returns the loop state of a resume checkpoint after loading weights, optimizer and RNG in place.

    ``modules`` get the weights ``save_resume_checkpoint`` stored for them (the same names).

    Call it last before training continues: restoring the RNG must come after anything (model
    building, method setup) that draws random numbers. Exact resume holds at the rank count the
    checkpoint was written with; another count is refused (the data shares and RNG streams differ).
    """
    manifest = read_manifest(folder)
    written_by = int(manifest.get("world_size", 1))
    if written_by != ranks.world_size:
        raise ValueError(f"checkpoint {folder} was written by {written_by} processes; this attempt runs "
                         f"{ranks.world_size} (resume with the same resources.gpus)")
    load_trainable_weights(folder, model)
    if modules:
        stored = torch.load(folder / "modules.pt", weights_only=True)
        if set(stored) != set(modules):
            raise ValueError(f"checkpoint {folder} holds modules {sorted(stored)}, not {sorted(modules)}")
        for name, module in modules.items():
            module.load_state_dict(stored[name])
    _load_optimizer_state(model, optimizer, torch.load(folder / "optimizer.pt", weights_only=True), ranks)
    _restore_rng(torch.load(folder / _rng_file(ranks.rank), weights_only=True))
    return ResumeState(
        step=int(manifest["step"]),
        method_state=torch.load(folder / "method_state.pt", weights_only=True),
        trainer_state=json.loads((folder / "trainer_state.json").read_text()),
    )


def complete_checkpoints(stage_folder: Path) -> list[Path]:
    """Returns a stage's complete resume checkpoints, oldest step first."""
    if not stage_folder.is_dir():
        return []
    found = [p for p in stage_folder.iterdir()
             if _CHECKPOINT_NAME.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_complete_checkpoint(work_dir: Path) -> tuple[int, Path] | None:
    """Returns (stage_index, folder) of the furthest complete resume checkpoint, or None."""
    if not work_dir.is_dir():
        return None
    stages = sorted(
        (int(m.group(1)), p) for p in work_dir.iterdir() if (m := _STAGE_NAME.match(p.name))
    )
    for index, folder in reversed(stages):
        checkpoints = complete_checkpoints(folder)
        if checkpoints:
            return index, checkpoints[-1]
    return None


def remove_incomplete(stage_folder: Path) -> None:
    """Deletes half-written ``*.tmp`` folders a crash left behind."""
    if stage_folder.is_dir():
        for path in stage_folder.glob("*.tmp"):
            shutil.rmtree(path, ignore_errors=True)


def prune_checkpoints(stage_folder: Path, keep: int) -> list[Path]:
    """Returns the checkpoint folders deleted to keep the last ``keep`` plus the best by eval_loss."""
    checkpoints = complete_checkpoints(stage_folder)
    kept = set(checkpoints[-keep:])
    scored = [(read_manifest(p)["metrics"].get("eval_loss"), p) for p in checkpoints]
    scored = [(loss, p) for loss, p in scored if loss is not None]
    if scored:
        kept.add(min(scored, key=lambda item: item[0])[1])
    removed = [p for p in checkpoints if p not in kept]
    for path in removed:
        shutil.rmtree(path)
    return removed


# ---------------------------------------------------------------- exports


def export_adapter(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path, *, stage_index: int, step: int,
    config: dict[str, Any],
) -> CheckpointInfo:
    """Returns the info of a PEFT adapter folder (loads with ``PeftModel.from_pretrained``)."""
    manifest = {"kind": "adapter", "stage_index": stage_index, "step": step, "config": config}
    with staged_folder(out_dir) as tmp:
        # The base vocabulary is never resized, so the adapter needs no copy of the embedding layers
        # (peft would add one whenever lm_head is a LoRA target).
        model.save_pretrained(tmp, selected_adapters=[POLICY_ADAPTER], save_embedding_layers=False)
        tokenizer.save_pretrained(tmp)
        return _export_info(tmp, out_dir, manifest, "adapter", stage_index, step)


def export_merged(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: Path, *, base_model_dir: Path,
    stage_index: int, step: int, config: dict[str, Any], kind: CheckpointKind = "merged",
    extra_files: Mapping[str, Callable[[Path], None]] | None = None,
) -> CheckpointInfo:
    """Returns the info of a full model folder with the adapter merged in (plain ``from_pretrained``).

    ``extra_files`` name -> writer add files (a reward model's head) before the manifest is written.

    The merge happens in float32 on a fresh copy of the base loaded from ``base_model_dir`` (the
    training model is left untouched), then the weights are cast back to the base's saved dtype
    so a bf16 base does not come back twice its size.
    """
    merged_base = "original"
    if isinstance(model, PeftModel):
        saved_dtype = AutoConfig.from_pretrained(base_model_dir).dtype or torch.float32
        fresh = load_base_model(base_model_dir, torch.float32, torch.device("cpu"))
        quantized = dequantized_weights(model)
        if quantized:
            # A QLoRA adapter learned corrections to the 4-bit base, so it is merged into the
            # dequantised weights it trained against, not into the original ones.
            merged_base = "dequantized_4bit"
            with torch.no_grad():
                for name, weight in quantized.items():
                    fresh.get_submodule(name).weight.copy_(weight)
        lora_config = copy.deepcopy(model.peft_config[POLICY_ADAPTER])
        clone = get_peft_model(fresh, lora_config, adapter_name=POLICY_ADAPTER)
        weights = get_peft_model_state_dict(model, adapter_name=POLICY_ADAPTER, save_embedding_layers=False)
        set_peft_model_state_dict(clone, weights, adapter_name=POLICY_ADAPTER)
        merged = clone.merge_and_unload().to(saved_dtype)
    else:
        merged = model
    manifest = {"kind": kind, "stage_index": stage_index, "step": step, "config": config,
                "merged_base": merged_base}
    with staged_folder(out_dir) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, write in (extra_files or {}).items():
            write(tmp / name)
        return _export_info(tmp, out_dir, manifest, kind, stage_index, step)


def _export_info(
    tmp: Path, final: Path, manifest: dict[str, Any], kind: CheckpointKind, stage_index: int, step: int
) -> CheckpointInfo:
    files = _finalize(tmp, final, manifest)
    return CheckpointInfo(stage_index=stage_index, step=step, kind=kind, path=final, files=files)


def adapter_from_resume_checkpoint(
    checkpoint_dir: Path, out_dir: Path, *, base_model_dir: Path, adapter: LoraAdapter
) -> Path:
    """Returns a PEFT adapter folder with a resume checkpoint's LoRA weights (written once, atomically).

    It serves an intermediate step as a model: the policy is rebuilt as training built it, the
    checkpoint's trainable weights are loaded into it and it is saved as ``export_adapter`` would.
    """
    if (out_dir / "adapter_config.json").is_file():
        return out_dir
    # A per-process staging name: two API processes may serve the same step for the first time.
    with staged_folder(out_dir.with_name(f"{out_dir.name}.{os.getpid()}")) as tmp:
        model = load_policy(base_model_dir, adapter, torch.device("cpu"))
        load_trainable_weights(checkpoint_dir, model)
        model.save_pretrained(tmp, selected_adapters=[POLICY_ADAPTER], save_embedding_layers=False)
        _fsync_tree(tmp)
        if out_dir.exists():  # another process finished first; its folder is as good as ours
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out_dir)
    return out_dir
