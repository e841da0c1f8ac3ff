"""Multi-stage run specs through run_pipeline on the tiny model, from JSONL files to exports.

SFT → DPO → GRPO (issue 3's acceptance), the seed documents' warmup SFT → SFT → PPO, and SFT → SAD
with a local teacher resolved by name. Each test checks the stage events, every stage's own
metrics, the weight hand-over between stages and the exports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.unit.trainer_core.factories import dpo_stage, run_spec, sft_stage, write_datasets
from trainer_core.checkpoint import read_manifest
from trainer_core.config import RunSpec
from trainer_core.errors import TrainingDataError
from trainer_core.pipeline import PipelineResult, run_pipeline
from trainer_core.reporting import RecordingReporter

SFT_METRICS = {"loss", "mean_token_accuracy", "lr", "grad_norm", "tokens_per_second", "step_time"}
DPO_METRICS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected"}
GRPO_METRICS = {"reward", "reward_std", "rewards/regex", "frac_reward_zero_std", "kl", "clip_ratio",
                "completions/mean_length", "completions/clipped_ratio"}
PPO_METRICS = {"objective/kl", "objective/scores", "policy/approxkl", "policy/clipfrac", "loss/policy",
               "loss/value", "policy/entropy"}
SAD_METRICS = {"kl/reasoning", "kl/action", "loss/reasoning", "loss/action"}


def _run(
    spec: RunSpec, model_dir: Path, tmp_path: Path, **kwargs: Any
) -> tuple[PipelineResult, RecordingReporter, Path]:
    """Returns the result, the recorded reports and the work folder of one run on fresh JSONL files."""
    paths, formats = write_datasets(tmp_path)
    reporter, work = RecordingReporter(), tmp_path / "work"
    result = run_pipeline(spec, base_model_path=model_dir, dataset_paths=paths, dataset_formats=formats,
                          work_dir=work, reporter=reporter, device="cpu", **kwargs)
    return result, reporter, work


def _stage_events(reporter: RecordingReporter) -> list[tuple[str, int, str]]:
    return [(kind, data["stage_index"], data["method"]) for kind, _, data in reporter.events
            if kind in ("stage_started", "stage_finished")]


def _last_train(reporter: RecordingReporter, stage_index: int) -> dict[str, float]:
    return [v for s, _, split, v in reporter.metrics if s == stage_index and split == "train"][-1]


def _assert_handed_over(work: Path, stage_index: int, last_step: int) -> None:
    """Checks stage ``stage_index`` started from exactly the weights the previous stage ended with."""
    start = load_file(str(work / f"stage-{stage_index}" / "start" / "adapter_model.safetensors"))
    final = load_file(str(work / f"stage-{stage_index - 1}" / f"checkpoint-{last_step:08d}"
                          / "trainable.safetensors"))
    assert len(start) == len(final)
    for name, value in final.items():
        assert torch.equal(start[name.replace(".default.", ".")], value)


def _moved(work: Path, stage_index: int, adapter_dir: Path) -> bool:
    """Returns whether the exported adapter differs from the weights stage ``stage_index`` started from."""
    start = load_file(str(work / f"stage-{stage_index}" / "start" / "adapter_model.safetensors"))
    final = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return any(not torch.equal(start[name], final[name]) for name in start)


def _assert_exports(result: PipelineResult, model_dir: Path, stages: int) -> None:
    """Checks both exports exist with manifests naming the last stage and load with peft / transformers."""
    assert result.status == "succeeded" and set(result.exports) == {"adapter", "merged"}
    for kind, folder in result.exports.items():
        manifest = read_manifest(folder)
        assert manifest["kind"] == kind and manifest["stage_index"] == stages - 1
        for entry in manifest["files"]:
            assert (folder / entry["path"]).stat().st_size == entry["size"]
    ids = torch.tensor([[1, 40, 41, 42]])
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(base, result.exports["adapter"]).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(result.exports["merged"]).eval()(ids).logits
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=0)


def _print_final(name: str, reporter: RecordingReporter, stages: int, keys: list[set[str]]) -> None:
    # Printed for the record (pytest -s): each stage's last train metrics of interest.
    for index in range(stages):
        last = _last_train(reporter, index)
        shown = ", ".join(f"{k}={last[k]:.4f}" for k in sorted(keys[index] | {"loss"}) if k in last)
        print(f"{name} stage {index}: {shown}")


def test_sft_dpo_grpo_spec_completes(tiny_model_dir: Path, tmp_path: Path) -> None:
    grpo = {"method": "grpo", "datasets": [{"id": "ds_prompts"}], "max_steps": 3, "batch_size": 8,
            "num_generations": 4, "max_new_tokens": 6, "learning_rate": 1e-2, "beta": 0.05,
            "max_seq_len": 64, "eval_fraction": 0.25,
            # exact_match alone is all zeros on a random model (no advantage, no update); a word that
            # starts with a vowel (~14% of the tiny vocabulary) gives the groups reward variance.
            "reward": {"type": "combined", "functions": [{"type": "exact_match"},
                                                         {"type": "regex", "pattern": "^[aeiou]"}]}}
    spec = run_spec([sft_stage(), dpo_stage(), grpo])
    result, reporter, work = _run(spec, tiny_model_dir, tmp_path)

    assert _stage_events(reporter) == [("stage_started", 0, "sft"), ("stage_finished", 0, "sft"),
                                       ("stage_started", 1, "dpo"), ("stage_finished", 1, "dpo"),
                                       ("stage_started", 2, "grpo"), ("stage_finished", 2, "grpo")]
    steps = [(s, step) for s, step, split, _ in reporter.metrics if split == "train"]
    assert steps == [(stage, i) for stage, count in enumerate([6, 4, 3]) for i in range(1, count + 1)]
    assert SFT_METRICS <= set(_last_train(reporter, 0))
    assert DPO_METRICS <= set(_last_train(reporter, 1))
    assert GRPO_METRICS <= set(_last_train(reporter, 2))
    sft_loss = reporter.train_series("loss", stage_index=0)
    assert sft_loss[-1] < sft_loss[0]
    evals = {(s, tuple(sorted(v))) for s, _, split, v in reporter.metrics if split == "eval"}
    assert any(s == 0 and "eval_loss" in keys for s, keys in evals)
    assert any(s == 2 and "reward" in keys for s, keys in evals)
    # DPO's reference is the SFT result, so its first margins are zero; GRPO's first KL too.
    assert abs(reporter.train_series("rewards/margins", stage_index=1)[0]) < 1e-5
    assert abs(reporter.train_series("kl", stage_index=2)[0]) < 1e-5
    _assert_handed_over(work, 1, last_step=6)
    _assert_handed_over(work, 2, last_step=4)
    assert set(GRPO_METRICS) <= set(result.final_metrics)
    assert min(reporter.train_series("frac_reward_zero_std", stage_index=2)) < 1
    assert _moved(work, 2, result.exports["adapter"])
    _assert_exports(result, tiny_model_dir, stages=3)
    _print_final("sft→dpo→grpo", reporter, 3, [SFT_METRICS, DPO_METRICS, GRPO_METRICS])


def test_warmup_sft_then_sft_then_ppo(tiny_model_dir: Path, tmp_path: Path) -> None:
    # The seed documents' pipeline: a warmup SFT on plain chats, SFT on agent traces, then PPO.
    warmup = sft_stage(max_steps=3, learning_rate=5e-3, eval_fraction=0.0, eval_every_steps=None,
                       warmup_steps=1)
    traces = sft_stage("ds_traj", max_steps=4, batch_size=2, eval_fraction=0.0, eval_every_steps=None,
                       max_seq_len=96)
    ppo = {"method": "ppo", "datasets": [{"id": "ds_prompts"}], "max_steps": 3, "batch_size": 4,
           "ppo_epochs": 2, "max_new_tokens": 4, "learning_rate": 1e-2, "max_seq_len": 64,
           "reward": {"type": "combined", "functions": [{"type": "exact_match"},
                                                        {"type": "length_penalty", "max_length": 8}]}}
    result, reporter, work = _run(run_spec([warmup, traces, ppo], export=["adapter", "merged"]),
                                  tiny_model_dir, tmp_path)

    assert [m for kind, _, m in _stage_events(reporter) if kind == "stage_finished"] == ["sft", "sft", "ppo"]
    assert [e[2]["total_steps"] for e in reporter.events if e[0] == "stage_started"] == [3, 4, 3]
    assert SFT_METRICS <= set(_last_train(reporter, 0)) and SFT_METRICS <= set(_last_train(reporter, 1))
    assert PPO_METRICS | {"rewards/exact_match", "rewards/length_penalty"} <= set(_last_train(reporter, 2))
    assert reporter.train_series("lr", stage_index=0)[0] == 5e-3  # one warmup step reaches the peak
    _assert_handed_over(work, 1, last_step=3)
    _assert_handed_over(work, 2, last_step=4)
    assert _moved(work, 2, result.exports["adapter"])
    _assert_exports(result, tiny_model_dir, stages=3)
    _print_final("warmup→sft→ppo", reporter, 3, [SFT_METRICS, SFT_METRICS, PPO_METRICS])


def test_sft_then_sad_with_a_local_teacher_resolved_by_name(
    tiny_model_dir: Path, tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    resolved: list[str] = []

    def resolve_model(name: str) -> Path:
        resolved.append(name)
        if name != "tiny-teacher":
            raise TrainingDataError(f"model {name!r} not found")
        return tiny_teacher_dir

    sad = {"method": "sad", "datasets": [{"id": "ds_traj"}], "max_steps": 6, "batch_size": 2,
           "learning_rate": 2e-2, "max_seq_len": 128, "lr_scheduler": "constant",
           "teacher": {"source": "model", "model": "tiny-teacher", "top_k": 64}}
    traces = sft_stage("ds_traj", max_steps=3, batch_size=2, eval_fraction=0.0, eval_every_steps=None,
                       max_seq_len=128)
    result, reporter, work = _run(run_spec([traces, sad]), tiny_model_dir, tmp_path,
                                  resolve_model=resolve_model)

    assert resolved == ["tiny-teacher"]
    assert [m for kind, _, m in _stage_events(reporter) if kind == "stage_finished"] == ["sft", "sad"]
    assert SAD_METRICS <= set(_last_train(reporter, 1))
    assert _moved(work, 1, result.exports["adapter"])
    kl = [r + a for r, a in zip(reporter.train_series("kl/reasoning", stage_index=1),
                                reporter.train_series("kl/action", stage_index=1), strict=True)]
    assert kl[-1] < kl[0]
    _assert_handed_over(work, 1, last_step=3)
    _assert_exports(result, tiny_model_dir, stages=2)
    _print_final("sft→sad", reporter, 2, [SFT_METRICS, SAD_METRICS])

    # An unknown teacher name is a user error before the SAD stage trains a step.
    bad = run_spec([{**sad, "teacher": {"source": "model", "model": "no-such-teacher"}}])
    reporter = RecordingReporter()
    paths, formats = write_datasets(tmp_path)
    with pytest.raises(TrainingDataError, match="no-such-teacher"):
        run_pipeline(bad, base_model_path=tiny_model_dir, dataset_paths=paths, dataset_formats=formats,
                     work_dir=tmp_path / "bad", reporter=reporter, device="cpu", resolve_model=resolve_model)
    assert not [m for m in reporter.metrics if m[2] == "train"]
