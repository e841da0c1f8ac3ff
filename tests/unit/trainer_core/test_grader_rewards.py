"""Graders as the reward of an RL stage: a failing sandboxed grader is counted and the run goes on."""

from __future__ import annotations

from pathlib import Path

from tests.unit.trainer_core.factories import VOWEL_PROMPTS, train_rollout_stage
from trainer_core.config import GRPOStage
from trainer_core.reporting import RecordingReporter

# Scores a vowel-first completion 1; records marked "hostile" hang, fork or open sockets instead.
VOWEL_GRADER = '''
import os, socket

def grade(sample, item):
    kind = item.get("hostile")
    if kind == "loop":
        while True:
            pass
    if kind == "fork":
        while True:
            os.fork()
    if kind == "socket":
        socket.create_connection(("127.0.0.1", 6379), timeout=1)
    return float(sample["output_text"][:1].lower() in "aeiou")
'''


def test_grpo_with_a_python_grader_counts_errors_and_goes_on(tmp_path: Path, tiny_model_dir: Path) -> None:
    hostile = ["loop", "fork", "socket", None, None, None, None, None]
    records = [{**record, "hostile": kind} for record, kind in zip(VOWEL_PROMPTS, hostile, strict=True)]
    stage = GRPOStage.model_validate({
        "method": "grpo", "datasets": [{"id": "ds_prompts"}], "max_steps": 2, "learning_rate": 5e-2,
        "batch_size": 16, "num_generations": 4, "max_new_tokens": 1, "max_seq_len": 64,
        "reward": {"type": "python", "name": "vowel", "source": VOWEL_GRADER, "timeout_seconds": 0.5},
    })
    reporter = RecordingReporter()
    train_rollout_stage(tmp_path, tiny_model_dir, stage, records, reporter, stage_index=0, seed=3,
                        eval_records=records[3:5], checkpoint_every=10)
    train = [metrics for _, _, split, metrics in reporter.metrics if split == "train"]
    assert len(train) == 2  # both steps trained
    # 4 prompts per step, 4 completions each: every completion of a hostile prompt is an error.
    errors = [m["rewards/vowel/errors"] for m in train]
    assert all(0 <= e <= 12 for e in errors) and sum(errors) > 0
    assert all(0.0 <= m["rewards/vowel"] <= 1.0 for m in train)
