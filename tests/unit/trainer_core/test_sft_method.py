"""SFT method: packed == padded loss, learning on a learnable set, clear data errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer_core.config import LoraAdapter, SFTStage
from trainer_core.errors import TrainingDataError
from trainer_core.loop import CheckpointPolicy, train_stage
from trainer_core.methods.base import RECORD_FORMAT_KEY, StageContext
from trainer_core.methods.sft import SFTMethod
from trainer_core.modeling import ReferencePolicy, load_policy, load_tokenizer
from trainer_core.reporting import RecordingReporter

CPU = torch.device("cpu")
COLOURS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
# The tiny model's random lm_head gives near-uniform logits that LoRA on the attention/MLP layers
# alone cannot sharpen much, so the tests adapt lm_head too (also covering a LoRA-wrapped head).
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def phrase_records(n: int) -> list[dict]:
    """Returns chat records whose answers follow a fixed pattern a tiny LoRA learns in a few steps."""
    records = []
    for i in range(n):
        colour = COLOURS[i % len(COLOURS)]
        records.append({
            "messages": [
                {"role": "user", "content": f"What colour is item {i}?"},
                {"role": "assistant", "content": f"The item is {colour}. Sure, the answer is {colour}."},
            ],
            RECORD_FORMAT_KEY: "sft",
        })
    return records


def make_context(model_dir: Path, stage, train: list[dict], eval_records: list[dict], work_dir: Path,
                 adapter=None) -> StageContext:
    """Returns a stage context over in-memory records (no datasets on disk)."""
    adapter = adapter or LoraAdapter(r=8, alpha=16, dropout=0.0, target_modules=TARGETS)
    return StageContext(
        stage=stage, stage_index=0, seed=3, adapter=adapter, tokenizer=load_tokenizer(model_dir),
        train_records=train, eval_records=eval_records, device=CPU, work_dir=work_dir,
        reference=ReferencePolicy(work_dir / "start", adapter, CPU),
    )


def sft_stage(**overrides) -> SFTStage:
    values = dict(method="sft", datasets=[{"id": "d"}], max_steps=20, learning_rate=1e-2, batch_size=8,
                  warmup_steps=2, max_seq_len=128)
    return SFTStage(**{**values, **overrides})


def test_packed_and_padded_batches_give_the_same_loss(tiny_model_dir: Path, tmp_path: Path) -> None:
    records = phrase_records(8)
    losses = []
    for packing in (True, False):
        ctx = make_context(tiny_model_dir, sft_stage(packing=packing), records, [], tmp_path)
        method = SFTMethod(ctx)
        torch.manual_seed(0)
        model = load_policy(tiny_model_dir, ctx.adapter, CPU).eval()
        batch = method._collate(method.train)
        with torch.no_grad():
            out = method.loss(model, batch, 1)
        losses.append((float(out.loss), out.num_units, out.num_tokens))
        if packing:
            assert batch.inputs["attention_mask"].dim() == 4
            assert batch.inputs["input_ids"].numel() < sum(len(e) for e in method.train) * 1.5
    assert losses[0][1:] == losses[1][1:]
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-5)


def test_eval_loss_falls_on_a_learnable_set(tiny_model_dir: Path, tmp_path: Path) -> None:
    stage = sft_stage(eval_dataset="d_eval", eval_every_steps=10)
    ctx = make_context(tiny_model_dir, stage, phrase_records(48), phrase_records(56)[48:], tmp_path)
    method = SFTMethod(ctx)
    torch.manual_seed(0)
    model = load_policy(tiny_model_dir, ctx.adapter, CPU)
    model.eval()
    with torch.no_grad():
        before = method.evaluate(model)["eval_loss"]
    reporter = RecordingReporter()
    outcome = train_stage(model, method, stage, stage_index=0, stage_folder=tmp_path / "stage-0",
                          tokenizer=ctx.tokenizer, checkpoints=CheckpointPolicy(None, 1), reporter=reporter,
                          device=CPU, manifest_config={})
    after = outcome.final_metrics["eval_loss"]
    print(f"SFT eval loss {before:.3f} -> {after:.3f} ({1 - after / before:.0%} drop)")
    assert after <= 0.7 * before
    evals = [v for _, _, split, v in reporter.metrics if split == "eval"]
    assert [set(v) >= {"eval_loss", "perplexity"} for v in evals] == [True] * 2
    assert all(v > 0 for v in reporter.train_series("tokens_per_second"))


def test_everything_truncated_away_is_a_user_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    stage = sft_stage(max_seq_len=8, truncation="drop")
    with pytest.raises(TrainingDataError, match="dropped by truncation"):
        SFTMethod(make_context(tiny_model_dir, stage, phrase_records(4), [], tmp_path))


def test_trajectories_train_on_reasoning_and_action_only(tiny_model_dir: Path, tmp_path: Path) -> None:
    trace = {"text": "Thought: add them.\nAction: calculator[2+3]\nObservation: 5\nAnswer: 5",
             RECORD_FORMAT_KEY: "trajectories"}
    ctx = make_context(tiny_model_dir, sft_stage(), [trace], [], tmp_path)
    (example,) = SFTMethod(ctx).train
    tokenizer = ctx.tokenizer
    trained = tokenizer.decode([t for t, m in zip(example.input_ids, example.loss_mask, strict=True) if m])
    assert "add them" in trained and "calculator" in trained and "Answer: 5" in trained
    assert "Observation" not in trained
