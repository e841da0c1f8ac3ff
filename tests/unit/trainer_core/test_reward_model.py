"""Reward models: Bradley-Terry by hand, the reward_model stage learning a preference, its export and
the scorer PPO/GRPO graders use."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.unit.trainer_core.factories import preference_rows, run_spec, write_jsonl
from trainer_core.checkpoint import read_manifest
from trainer_core.grader_config import RewardModelGrader
from trainer_core.graders.scoring import GraderRuntime, build_grader
from trainer_core.losses.reward_model import bradley_terry_loss
from trainer_core.pipeline import run_pipeline
from trainer_core.reporting import RecordingReporter
from trainer_core.reward_models import HEAD_FILE, load_reward_model_scorer


def test_bradley_terry_by_hand() -> None:
    chosen, rejected = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 2.0])
    loss, metrics = bradley_terry_loss(chosen, rejected)
    # -log sigma(1) = log(1 + e^-1), -log sigma(-1) = log(1 + e), -log sigma(0) = log 2.
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.e) + math.log(2)) / 3
    assert loss.item() == pytest.approx(expected)
    assert metrics["accuracy"].item() == pytest.approx(1 / 3)
    assert metrics["margin"].item() == pytest.approx(0.0)
    total, _ = bradley_terry_loss(chosen, rejected, reduction="sum")
    assert total.item() == pytest.approx(3 * expected)


def test_reward_model_stage_learns_a_preference_and_exports_a_scorer(tiny_model_dir: Path,
                                                                       tmp_path: Path) -> None:
    paths = {"ds_pref": write_jsonl(tmp_path / "pref.jsonl", preference_rows(32))}
    spec = run_spec(
        [{"method": "reward_model", "datasets": [{"id": "ds_pref"}], "max_steps": 12, "batch_size": 8,
          "learning_rate": 5e-3, "max_seq_len": 64, "eval_fraction": 0.25, "eval_every_steps": 6,
          "lr_scheduler": "constant"}],
        export=["reward_model"], dropout=0.1,
    )
    reporter = RecordingReporter()
    work = tmp_path / "work"
    result = run_pipeline(spec, base_model_path=tiny_model_dir, dataset_paths=paths,
                          dataset_formats={"ds_pref": "preference"}, work_dir=work, reporter=reporter,
                          device="cpu")
    assert result.status == "succeeded"
    folder = result.exports["reward_model"]
    assert read_manifest(folder)["kind"] == "reward_model" and (folder / HEAD_FILE).is_file()
    assert [c.kind for c in reporter.checkpoints if c.kind != "resume"] == ["reward_model"]
    final = result.final_metrics
    print(f"reward model eval accuracy {final['eval_accuracy']:.2f}, margin {final['eval_margin']:.3f}")
    assert final["eval_accuracy"] == 1.0 and final["eval_margin"] > 0.5
    assert reporter.train_series("loss")[-1] < reporter.train_series("loss")[0]

    # The exported checkpoint scores as the stage did: chosen answers above rejected ones.
    scorer = load_reward_model_scorer(folder, batch_size=4)
    items = [{"prompt": f"Question {i}: is {i} a number?"} for i in (40, 41)]
    chosen = scorer([" Yes, 40 is a number.", " Yes, 41 is a number."], items)
    rejected = scorer([" No. 40 wrong.", " No. 41 wrong."], items)
    assert all(c > r for c, r in zip(chosen, rejected, strict=True))

    grader = build_grader(RewardModelGrader(type="reward_model", name="rm", model="ckpt_x"),
                          GraderRuntime(reward_model=lambda spec: load_reward_model_scorer(folder)))
    scores = grader([" Yes, 40 is a number.", " No. 40 wrong."], items[:1] * 2)
    assert scores.totals == pytest.approx([chosen[0], rejected[0]], abs=1e-4)
    assert scores.errors == {"rm": 0}
