"""Resume checkpoints: manifest and checksums, completeness, latest, retention, exact restore."""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer_core.checkpoint import (
    MANIFEST,
    complete_checkpoints,
    latest_complete_checkpoint,
    load_resume_checkpoint,
    prune_checkpoints,
    read_manifest,
    remove_incomplete,
    save_resume_checkpoint,
    stage_finished,
)
from trainer_core.config import LoraAdapter
from trainer_core.modeling import load_policy, trainable_parameters

CPU = torch.device("cpu")


@pytest.fixture()
def policy(tiny_model_dir: Path):
    torch.manual_seed(0)
    model = load_policy(tiny_model_dir, LoraAdapter(r=4, alpha=8), CPU)
    return model, torch.optim.AdamW(trainable_parameters(model).values(), lr=1e-3)


def _save(folder: Path, step: int, model, optimizer, stage_index: int = 0, eval_loss: float | None = None,
          total_steps: int = 10):
    metrics = {} if eval_loss is None else {"eval_loss": eval_loss}
    return save_resume_checkpoint(
        folder / f"stage-{stage_index}", stage_index, step, total_steps=total_steps, model=model,
        optimizer=optimizer, method_state={"level": torch.tensor(3)}, trainer_state={"k": 1},
        config={"seed": 7}, metrics=metrics,
    )


def test_manifest_lists_every_file_with_its_checksum(policy, tmp_path: Path) -> None:
    model, optimizer = policy
    info = _save(tmp_path, 5, model, optimizer)
    assert info.path.name == "checkpoint-00000005" and info.kind == "resume"
    manifest = read_manifest(info.path)
    assert manifest["step"] == 5 and manifest["config"] == {"seed": 7}
    assert set(manifest["versions"]) == {"torch", "transformers", "peft"}
    on_disk = {p.name for p in info.path.iterdir()} - {MANIFEST}
    assert {f["path"] for f in manifest["files"]} == on_disk
    assert {"trainable.safetensors", "optimizer.pt", "rng.pt", "method_state.pt"} <= on_disk
    for entry in manifest["files"]:
        data = (info.path / entry["path"]).read_bytes()
        assert entry["size"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert not stage_finished(info.path) and stage_finished(_save(tmp_path, 10, model, optimizer).path)


def test_incomplete_folders_are_never_latest(policy, tmp_path: Path) -> None:
    model, optimizer = policy
    assert latest_complete_checkpoint(tmp_path) is None
    _save(tmp_path, 2, model, optimizer)
    good = _save(tmp_path, 4, model, optimizer).path
    # A crash mid-write leaves a .tmp folder; one without a manifest is not complete either.
    shutil.copytree(good, tmp_path / "stage-0" / "checkpoint-00000006.tmp")
    no_manifest = tmp_path / "stage-0" / "checkpoint-00000008"
    shutil.copytree(good, no_manifest)
    (no_manifest / MANIFEST).unlink()
    assert latest_complete_checkpoint(tmp_path) == (0, good)
    later_stage = _save(tmp_path, 1, model, optimizer, stage_index=1).path
    assert latest_complete_checkpoint(tmp_path) == (1, later_stage)
    remove_incomplete(tmp_path / "stage-0")
    assert not (tmp_path / "stage-0" / "checkpoint-00000006.tmp").exists()


def test_prune_keeps_last_k_plus_best(policy, tmp_path: Path) -> None:
    model, optimizer = policy
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, None), (5, 2.5)]:
        _save(tmp_path, step, model, optimizer, eval_loss=loss)
    removed = prune_checkpoints(tmp_path / "stage-0", keep=2)
    assert sorted(p.name for p in removed) == ["checkpoint-00000001", "checkpoint-00000003"]
    assert [p.name for p in complete_checkpoints(tmp_path / "stage-0")] == [
        "checkpoint-00000002", "checkpoint-00000004", "checkpoint-00000005"
    ]


def test_restore_brings_back_weights_optimizer_and_rng(policy, tiny_model_dir: Path, tmp_path: Path) -> None:
    model, optimizer = policy
    params = trainable_parameters(model)
    sum(p.sum() for p in params.values()).backward()
    optimizer.step()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    info = _save(tmp_path, 3, model, optimizer)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())

    torch.manual_seed(99)
    other = load_policy(tiny_model_dir, LoraAdapter(r=4, alpha=8), CPU)
    other_optimizer = torch.optim.AdamW(trainable_parameters(other).values(), lr=1e-3)
    state = load_resume_checkpoint(info.path, model=other, optimizer=other_optimizer)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert state.step == 3 and state.trainer_state == {"k": 1}
    assert int(state.method_state["level"]) == 3
    for name, p in trainable_parameters(other).items():
        assert torch.equal(p, params[name])
    first = next(iter(optimizer.state.values()))
    restored = next(iter(other_optimizer.state.values()))
    assert torch.equal(first["exp_avg"], restored["exp_avg"])
