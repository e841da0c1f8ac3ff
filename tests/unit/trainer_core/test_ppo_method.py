from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.trainer_core.factories import VOWEL_FIRST_REWARD, VOWEL_PROMPTS, train_rollout_stage
from trainer_core.config import PPOStage
from trainer_core.reporting import RecordingReporter


def _stage(**overrides: object) -> PPOStage:
    fields: dict = {
        "method": "ppo", "datasets": [{"id": "ds_prompts"}], "max_steps": 12, "learning_rate": 2e-2,
        "batch_size": 16, "gradient_accumulation": 2, "ppo_epochs": 2, "max_new_tokens": 1,
        "reward": VOWEL_FIRST_REWARD, "lr_scheduler": "constant", "max_seq_len": 64,
    }
    return PPOStage.model_validate(fields | overrides)


def _train(
    tmp_path: Path, model_dir: Path, stage: PPOStage, reporter: RecordingReporter,
    resume_from: Path | None = None,
) -> None:
    train_rollout_stage(tmp_path, model_dir, stage, VOWEL_PROMPTS, reporter, stage_index=1, seed=5,
                        eval_records=[], checkpoint_every=3, resume_from=resume_from)


def test_ppo_doubles_the_score_on_a_toy_task(tmp_path: Path, tiny_model_dir: Path) -> None:
    reporter = RecordingReporter()
    _train(tmp_path, tiny_model_dir, _stage(), reporter)
    scores = reporter.train_series("objective/scores")
    start, end = sum(scores[:4]) / 4, sum(scores[-4:]) / 4
    print(f"PPO reward {start:.3f} -> {end:.3f}")
    assert start > 0 and end >= 2 * start
    metrics = reporter.metrics[-1][3]
    for name in ("objective/kl", "policy/approxkl", "policy/clipfrac", "loss/policy", "loss/value",
                 "policy/entropy", "rewards/regex", "completions/mean_length"):
        assert name in metrics


def test_ppo_resume_inside_a_rollout_is_exact(tmp_path: Path, tiny_model_dir: Path) -> None:
    # Three epochs per rollout and a stop after step 3 land between two epochs of the same rollout.
    stage = _stage(max_steps=6, ppo_epochs=3, gradient_accumulation=1)
    straight = RecordingReporter()
    _train(tmp_path / "a", tiny_model_dir, stage, straight)
    stopped = RecordingReporter(stop_after_steps=2)
    _train(tmp_path / "b", tiny_model_dir, stage, stopped)
    resumed = RecordingReporter()
    checkpoint = tmp_path / "b" / "stage" / "checkpoint-00000002"
    _train(tmp_path / "b", tiny_model_dir, stage, resumed, resume_from=checkpoint)
    for name in ("loss", "loss/value", "policy/approxkl", "objective/scores"):
        assert stopped.train_series(name) + resumed.train_series(name) == pytest.approx(
            straight.train_series(name), abs=1e-6
        )
