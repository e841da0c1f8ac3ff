from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.trainer_core.factories import VOWEL_FIRST_REWARD, VOWEL_PROMPTS, train_rollout_stage
from trainer_core.config import GRPOStage, PromptCurriculum
from trainer_core.reporting import RecordingReporter


def _stage(**overrides: object) -> GRPOStage:
    fields: dict = {
        "method": "grpo", "datasets": [{"id": "ds_prompts"}], "max_steps": 16, "learning_rate": 5e-2,
        "batch_size": 16, "num_generations": 8, "max_new_tokens": 1, "reward": VOWEL_FIRST_REWARD,
        "lr_scheduler": "constant", "beta": 0.02, "max_seq_len": 64,
    }
    return GRPOStage.model_validate(fields | overrides)


def _train(
    tmp_path: Path, model_dir: Path, stage: GRPOStage, records: list[dict], reporter: RecordingReporter,
    resume_from: Path | None = None,
) -> None:
    train_rollout_stage(tmp_path, model_dir, stage, records, reporter, stage_index=0, seed=3,
                        eval_records=records[:2], checkpoint_every=4, resume_from=resume_from)


def test_grpo_doubles_the_reward_on_a_toy_task(tmp_path: Path, tiny_model_dir: Path) -> None:
    reporter = RecordingReporter()
    _train(tmp_path, tiny_model_dir, _stage(), VOWEL_PROMPTS, reporter)
    rewards = reporter.train_series("reward")
    start, end = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    print(f"GRPO reward {start:.3f} -> {end:.3f}")
    assert start > 0 and end >= 2 * start
    metrics = reporter.metrics[-2][3]  # last train step (the eval row follows it)
    for name in ("reward_std", "rewards/regex", "frac_reward_zero_std", "kl", "clip_ratio",
                 "completions/mean_length", "completions/clipped_ratio"):
        assert name in metrics
    assert reporter.metrics[-1][2] == "eval" and "reward" in reporter.metrics[-1][3]


def test_grpo_resume_mid_stage_repeats_the_same_steps(tmp_path: Path, tiny_model_dir: Path) -> None:
    stage = _stage(max_steps=6, loss_aggregation="dapo", curriculum=PromptCurriculum(window=4, threshold=0.1))
    records = [{**record, "difficulty": i % 2} for i, record in enumerate(VOWEL_PROMPTS)]
    straight = RecordingReporter()
    _train(tmp_path / "a", tiny_model_dir, stage, records, straight)
    stopped = RecordingReporter(stop_after_steps=4)
    _train(tmp_path / "b", tiny_model_dir, stage, records, stopped)
    resumed = RecordingReporter()
    _train(tmp_path / "b", tiny_model_dir, stage, records, resumed,
           resume_from=tmp_path / "b" / "stage" / "checkpoint-00000004")
    for name in ("reward", "loss", "curriculum/level"):
        assert stopped.train_series(name)[:4] + resumed.train_series(name) == pytest.approx(
            straight.train_series(name), abs=1e-6
        )
    assert straight.train_series("curriculum/level")[-1] == 1.0


def test_grpo_trains_on_paged_rollouts_with_importance_weights_near_one(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    # Continuous batching runs on CPU too; its log-probs are the policy's own, so the truncated
    # importance weights stay at 1 (to float rounding) and nothing is truncated.
    stage = _stage(max_steps=2, batch_size=4, num_generations=2, rollout={"engine": "paged"})
    reporter = RecordingReporter()
    _train(tmp_path, tiny_model_dir, stage, VOWEL_PROMPTS[:4], reporter)
    weights = reporter.train_series("rollout/is_weight")
    assert len(weights) == 2 and all(abs(w - 1) < 1e-3 for w in weights)
    assert reporter.train_series("rollout/is_truncated") == [0.0, 0.0]
