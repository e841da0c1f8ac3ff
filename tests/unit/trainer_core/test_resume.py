"""Exact resume through run_pipeline: stop mid-SFT, stop mid-DPO, resume — same run as straight."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.unit.trainer_core.factories import two_stage_spec, write_datasets
from trainer_core.pipeline import run_pipeline
from trainer_core.reporting import RecordingReporter


def _losses(reporters: list[RecordingReporter]) -> dict[tuple[int, int], float]:
    return {(s, step): v["loss"] for r in reporters for s, step, split, v in r.metrics if split == "train"}


@pytest.mark.slow
def test_stopped_and_resumed_run_equals_the_straight_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    paths, formats = write_datasets(tmp_path)
    spec = two_stage_spec(dropout=0.1)  # dropout on: the RNG streams must be restored too

    def run(work: Path, reporter: RecordingReporter):
        return run_pipeline(spec, base_model_path=tiny_model_dir, dataset_paths=paths,
                            dataset_formats=formats, work_dir=work, reporter=reporter, device="cpu")

    straight = RecordingReporter()
    assert run(tmp_path / "a", straight).status == "succeeded"

    # Stop after SFT step 3 (between periodic checkpoints), then in the middle of DPO, then finish.
    attempts = [RecordingReporter(stop_after_steps=3), RecordingReporter(stop_after_steps=5),
                RecordingReporter()]
    statuses = [run(tmp_path / "b", reporter).status for reporter in attempts]
    assert statuses == ["stopped", "stopped", "succeeded"]
    resumed_events = [e for r in attempts for e in r.events if e[0] == "resumed"]
    assert [e[1] for e in resumed_events] == ["resumed from stage 0 step 3", "resumed from stage 1 step 2"]

    expected, got = _losses([straight]), _losses(attempts)
    assert sorted(got) == sorted(expected) and len(expected) == 10
    diff = max(abs(expected[k] - got[k]) for k in expected)
    print(f"resume: max abs loss diff over {len(expected)} steps = {diff:.2e}")
    assert diff <= 1e-6
    weights_a = load_file(str(tmp_path / "a" / "export" / "adapter" / "adapter_model.safetensors"))
    weights_b = load_file(str(tmp_path / "b" / "export" / "adapter" / "adapter_model.safetensors"))
    assert weights_a.keys() == weights_b.keys()
    assert max((weights_a[k] - weights_b[k]).abs().max().item() for k in weights_a) <= 1e-6
