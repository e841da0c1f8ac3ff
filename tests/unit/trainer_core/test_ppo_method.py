from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.unit.trainer_core.factories import ROLLOUT_TARGETS, VOWEL_FIRST_REWARD, VOWEL_PROMPTS
from trainer_core.config import LoraAdapter, PPOStage
from trainer_core.loop import CheckpointPolicy, train_stage
from trainer_core.methods import build_method
from trainer_core.methods.base import StageContext
from trainer_core.modeling import ReferencePolicy, load_policy, load_tokenizer, save_policy_weights
from trainer_core.reporting import RecordingReporter

CPU = torch.device("cpu")
ADAPTER = LoraAdapter(r=8, alpha=16, dropout=0.0, target_modules=ROLLOUT_TARGETS)


def _stage(**overrides: object) -> PPOStage:
    fields: dict = {
        "method": "ppo", "datasets": [{"id": "ds_prompts"}], "max_steps": 12, "learning_rate": 5e-2,
        "batch_size": 16, "gradient_accumulation": 2, "ppo_epochs": 2, "max_new_tokens": 1,
        "reward": VOWEL_FIRST_REWARD, "lr_scheduler": "constant", "max_seq_len": 64,
    }
    return PPOStage.model_validate(fields | overrides)


def _train(
    tmp_path: Path, model_dir: Path, stage: PPOStage, reporter: RecordingReporter,
    resume_from: Path | None = None,
) -> None:
    tokenizer = load_tokenizer(model_dir)
    torch.manual_seed(0)
    start = tmp_path / "start"
    if not start.exists():
        save_policy_weights(load_policy(model_dir, ADAPTER, CPU), start)
    model = load_policy(model_dir, ADAPTER, CPU, start_dir=start)
    ctx = StageContext(
        stage=stage, stage_index=1, seed=5, adapter=ADAPTER, tokenizer=tokenizer, train_records=VOWEL_PROMPTS,
        eval_records=[], device=CPU, work_dir=tmp_path, reference=ReferencePolicy(start, ADAPTER, CPU),
    )
    train_stage(
        model, build_method(ctx), stage, stage_index=1, stage_folder=tmp_path / "stage", tokenizer=tokenizer,
        checkpoints=CheckpointPolicy(every_steps=3, keep=10), reporter=reporter, device=CPU,
        manifest_config={}, resume_from=resume_from,
    )


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
