"""The worker's launcher of multi-device runs: it stands in for run_pipeline, and rank 0's reports
reach the worker's reporter unchanged."""

from __future__ import annotations

import inspect
from pathlib import Path

from trainer_core.pipeline import run_pipeline
from trainer_core.reporting import CheckpointInfo, FileEntry, JsonlReporter, RecordingReporter, replay_reports
from worker.gang import _read_new, launch_pipeline


def test_launch_pipeline_takes_every_argument_the_worker_passes_run_pipeline() -> None:
    # The worker calls either with the same keywords; the rank's device and ranks come from torchrun.
    expected = set(inspect.signature(run_pipeline).parameters) - {"device", "ranks"}
    assert set(inspect.signature(launch_pipeline).parameters) == expected


def test_reports_replay_in_order_and_stop_follows_the_file(tmp_path: Path) -> None:
    reports, stop = tmp_path / "reports.jsonl", tmp_path / "stop"
    rank0 = JsonlReporter(reports, stop)
    info = CheckpointInfo(stage_index=0, step=2, kind="resume", path=tmp_path / "checkpoint-00000002",
                          files=[FileEntry("trainable.safetensors", 10, "ab" * 32)],
                          metrics={"eval_loss": 1.5})
    rank0.on_event("stage_started", "stage 0 (sft) started", {"stage_index": 0})
    rank0.on_metrics(0, 1, "train", {"loss": 2.0})
    rank0.on_checkpoint(info)
    rank0.on_checkpoint_removed(tmp_path / "checkpoint-00000001")
    # A line still being written is left for the next read.
    with open(reports, "a") as fh:
        fh.write('{"type": "metrics"')
    lines, offset = _read_new(reports, 0)
    worker = RecordingReporter()
    replay_reports(lines, worker)
    assert worker.events == [("stage_started", "stage 0 (sft) started", {"stage_index": 0})]
    assert worker.metrics == [(0, 1, "train", {"loss": 2.0})]
    assert worker.checkpoints == [info]
    assert worker.removed == [tmp_path / "checkpoint-00000001"]
    assert _read_new(reports, offset) == ([], offset)
    assert not rank0.should_stop()
    stop.touch()
    assert rank0.should_stop()
