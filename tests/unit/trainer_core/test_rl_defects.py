"""Defects of the RL stages found by the correctness review, each pinned by a test that failed before."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.unit.trainer_core.factories import (
    VOWEL_FIRST_REWARD,
    VOWEL_PROMPTS,
    rollout_context,
    train_rollout_stage,
)
from trainer_core.config import GRPOStage, PPOStage
from trainer_core.losses.grpo import grpo_advantages
from trainer_core.methods import build_method
from trainer_core.reporting import RecordingReporter


def _ppo(**overrides: object) -> PPOStage:
    fields: dict = {
        "method": "ppo", "datasets": [{"id": "ds_prompts"}], "max_steps": 1, "learning_rate": 2e-2,
        "batch_size": 8, "ppo_epochs": 1, "max_new_tokens": 2, "reward": VOWEL_FIRST_REWARD,
        "max_seq_len": 64,
    }
    return PPOStage.model_validate(fields | overrides)


def test_ppo_ratio_is_one_before_any_update_with_lora_dropout(tmp_path: Path, tiny_model_dir: Path) -> None:
    # With one epoch per rollout, every step's loss sees exactly the weights its rollout was scored
    # with, so the ratio is 1. Old log-probs came from eval mode and new ones from train mode with
    # LoRA dropout: once the adapter had moved off its zero init (step 2 on), approxkl and clipfrac
    # were > 0 before any update on that rollout.
    reporter = RecordingReporter()
    train_rollout_stage(tmp_path, tiny_model_dir, _ppo(max_steps=3), VOWEL_PROMPTS, reporter, stage_index=1,
                        seed=5, eval_records=[], checkpoint_every=10, dropout=0.3)
    steps = [metrics for _, _, split, metrics in reporter.metrics if split == "train"]
    assert len(steps) == 3
    for metrics in steps:
        assert metrics["policy/approxkl"] < 1e-10
        assert metrics["policy/clipfrac"] == 0.0


def test_ppo_trains_on_a_rollout_of_one_token(tmp_path: Path, tiny_model_dir: Path) -> None:
    # batch_size 1 and max_new_tokens 1 passed validation, then whitening one token crashed.
    reporter = RecordingReporter()
    stage = _ppo(batch_size=1, max_new_tokens=1, max_steps=2)
    train_rollout_stage(tmp_path, tiny_model_dir, stage, VOWEL_PROMPTS, reporter, stage_index=1, seed=5,
                        eval_records=[], checkpoint_every=10)
    assert [step for _, step, split, _ in reporter.metrics if split == "train"] == [1, 2]


def test_grpo_batch_advantage_scaling_takes_the_std_over_the_whole_step(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    stage = GRPOStage.model_validate({
        "method": "grpo", "datasets": [{"id": "ds_prompts"}], "max_steps": 1, "batch_size": 8,
        "num_generations": 4, "gradient_accumulation": 2, "max_new_tokens": 1, "max_seq_len": 64,
        "reward": VOWEL_FIRST_REWARD, "advantage_scaling": "batch", "temperature": 2.0,
    })
    model, ctx = rollout_context(tmp_path, tiny_model_dir, stage, VOWEL_PROMPTS, stage_index=0, seed=3,
                                 eval_records=[])
    method = build_method(ctx)
    method.setup(model, ctx.tokenizer)
    batches = method.micro_batches(model, 1)
    assert len(batches) == 2
    rewards = torch.cat([b.rewards for b in batches])
    expected, _ = grpo_advantages(rewards, 4, "batch")
    assert rewards.std() > 0  # the check below is meaningless when every reward is equal
    torch.testing.assert_close(torch.cat([b.advantages for b in batches]), expected)
