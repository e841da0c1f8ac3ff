"""run_pipeline end to end on the tiny model: SFT then DPO, stage hand-over, exports, user errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.unit.trainer_core.factories import two_stage_spec, write_datasets
from trainer_core.checkpoint import read_manifest
from trainer_core.errors import TrainingDataError
from trainer_core.pipeline import run_pipeline
from trainer_core.reporting import RecordingReporter


def test_sft_then_dpo_hands_weights_over_and_exports(tiny_model_dir: Path, tmp_path: Path) -> None:
    paths, formats = write_datasets(tmp_path)
    reporter = RecordingReporter()
    work = tmp_path / "work"
    result = run_pipeline(two_stage_spec(), base_model_path=tiny_model_dir, dataset_paths=paths,
                          dataset_formats=formats, work_dir=work, reporter=reporter, device="cpu")
    assert result.status == "succeeded"
    assert result.exports == {"adapter": work / "export" / "adapter", "merged": work / "export" / "merged"}
    kinds = [(e[0], e[2]["stage_index"]) for e in reporter.events if e[0].startswith("stage_")]
    assert kinds == [("stage_started", 0), ("stage_finished", 0), ("stage_started", 1), ("stage_finished", 1)]
    assert [e[2]["total_steps"] for e in reporter.events if e[0] == "stage_started"] == [6, 4]
    assert [s for s, _, split, _ in reporter.metrics if split == "train"] == [0] * 6 + [1] * 4

    # Stage 1 starts from (and is referenced against) exactly the weights stage 0 ended with.
    start = load_file(str(work / "stage-1" / "start" / "adapter_model.safetensors"))
    sft_final = load_file(str(work / "stage-0" / "checkpoint-00000006" / "trainable.safetensors"))
    assert len(start) == len(sft_final)
    for name, value in sft_final.items():
        saved = name.replace(".default.", ".")
        assert saved in start and (start[saved] == value).all()
    assert reporter.train_series("rewards/margins", stage_index=1)[0] == pytest.approx(0.0, abs=1e-5)

    assert {c.kind for c in reporter.checkpoints} == {"resume", "adapter", "merged"}
    assert read_manifest(result.exports["merged"])["kind"] == "merged"
    assert "eval_loss" in [k for _, _, split, v in reporter.metrics if split == "eval" for k in v]
    assert len(list((work / "stage-0").glob("checkpoint-*"))) <= 3  # last 2 + best


def test_wrong_dataset_format_is_a_user_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    paths, formats = write_datasets(tmp_path)
    spec = two_stage_spec()
    dpo_on_sft = spec.stages[1].model_copy(update={"datasets": spec.stages[0].datasets})
    bad = spec.model_copy(update={"stages": [dpo_on_sft]})
    with pytest.raises(TrainingDataError, match=r"stages\[0\]\.datasets\[0\].*format 'sft'"):
        run_pipeline(bad, base_model_path=tiny_model_dir, dataset_paths=paths, dataset_formats=formats,
                     work_dir=tmp_path / "w", reporter=RecordingReporter(), device="cpu")
    with pytest.raises(TrainingDataError, match="not provided"):
        run_pipeline(spec, base_model_path=tiny_model_dir, dataset_paths={}, dataset_formats={},
                     work_dir=tmp_path / "w2", reporter=RecordingReporter(), device="cpu")
