"""A stop request (a cancel, or a lease another attempt took) is seen inside a step: between
micro-batches and while sampling rollouts, not only when a step ends (issue 13, item 5).

Before, `gradient_accumulation: 10^9` stayed `cancelling` for 12 minutes and a GRPO step sampling
10^9 completions ran on after its lease was taken. Here the stop flag is up from the start: the
stage must end before finishing its first step, with no checkpoint of a half-made step.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.unit.trainer_core.factories import run_spec, sft_stage, write_datasets
from trainer_core.pipeline import run_pipeline
from trainer_core.reporting import RecordingReporter


class StopAtOnce(RecordingReporter):
    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    def should_stop(self) -> bool:
        self.asked += 1
        return True


def _run(stage: dict, model_dir: Path, tmp_path: Path) -> tuple[str, StopAtOnce, float]:
    paths, formats = write_datasets(tmp_path)
    reporter = StopAtOnce()
    started = time.monotonic()
    result = run_pipeline(run_spec([stage]), base_model_path=model_dir, dataset_paths=paths,
                          dataset_formats=formats, work_dir=tmp_path / "work", reporter=reporter,
                          device="cpu")
    return result.status, reporter, time.monotonic() - started


def test_a_long_accumulation_stops_between_micro_batches(tiny_model_dir: Path, tmp_path: Path) -> None:
    stage = sft_stage(max_steps=2, batch_size=1, gradient_accumulation=400, eval_fraction=0.0,
                      eval_every_steps=None)
    status, reporter, elapsed = _run(stage, tiny_model_dir, tmp_path)
    assert status == "stopped"
    assert not [m for m in reporter.metrics if m[2] == "train"]  # the first step never completed
    assert reporter.checkpoints == []
    assert elapsed < 60


def test_rollout_sampling_stops_mid_generation(tiny_model_dir: Path, tmp_path: Path) -> None:
    stage = {"method": "grpo", "datasets": [{"id": "ds_prompts"}], "max_steps": 2, "batch_size": 4,
             "num_generations": 2, "max_new_tokens": 48, "max_seq_len": 96}
    status, reporter, _ = _run(stage, tiny_model_dir, tmp_path)
    assert status == "stopped"
    assert not [m for m in reporter.metrics if m[2] == "train"]
    assert reporter.checkpoints == []
