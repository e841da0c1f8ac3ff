"""Mistakes in what a user supplied fail a run at once as TrainingDataError (never retried as a
system error): a base model folder that cannot load, LoRA targets the model does not have.

Before issue 13 both were raised as plain OSError/ValueError and retried three times (~40 s each).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.unit.trainer_core.factories import run_spec, sft_stage, write_datasets
from trainer_core.errors import TrainingDataError
from trainer_core.pipeline import run_pipeline
from trainer_core.reporting import RecordingReporter


def _run(spec_overrides: dict, model_dir: Path, tmp_path: Path) -> None:
    paths, formats = write_datasets(tmp_path)
    spec = run_spec([sft_stage(max_steps=2)], **spec_overrides)
    run_pipeline(spec, base_model_path=model_dir, dataset_paths=paths, dataset_formats=formats,
                 work_dir=tmp_path / "work", reporter=RecordingReporter(), device="cpu")


def test_a_base_folder_with_only_config_fails_at_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder / "config.json")
    started = time.monotonic()
    with pytest.raises(TrainingDataError, match="no weights.*no tokenizer"):
        _run({}, folder, tmp_path)
    assert time.monotonic() - started < 5


def test_lora_targets_the_model_lacks_are_a_user_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    for targets, match in ((["q_proj", "no_such_proj"], "no module 'no_such_proj'"), (["norm"], "norm")):
        adapter = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": targets}
        with pytest.raises(TrainingDataError, match=match):
            _run({"adapter": adapter}, tiny_model_dir, tmp_path)
