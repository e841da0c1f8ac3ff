"""DPO method: reference = stage-start policy, learns a synthetic preference, errors on empty data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer_core.config import DPOStage, LoraAdapter
from trainer_core.data import IGNORE_INDEX
from trainer_core.errors import TrainingDataError
from trainer_core.loop import CheckpointPolicy, train_stage
from trainer_core.losses.dpo import dpo_loss
from trainer_core.methods.base import RECORD_FORMAT_KEY, StageContext
from trainer_core.methods.dpo import DPOMethod, sequence_logps
from trainer_core.modeling import ReferencePolicy, load_policy, load_tokenizer, save_policy_weights
from trainer_core.reporting import RecordingReporter

CPU = torch.device("cpu")
# lm_head is adapted too: the tiny model's random head alone cannot sharpen its near-uniform logits.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def preference_records(n: int, offset: int = 0) -> list[dict]:
    """Returns pairs where the chosen answer always agrees politely and the rejected one refuses."""
    return [
        {"prompt": f"Question {i}: is {i} a number?", "chosen": f" Yes, {i} is a number. Thanks!",
         "rejected": f" No. {i} wrong bad.", RECORD_FORMAT_KEY: "preference"}
        for i in range(offset, offset + n)
    ]


def _context(model_dir: Path, stage: DPOStage, train: list[dict], eval_records: list[dict], work_dir: Path,
             dropout: float = 0.0, trained_adapter: bool = False):
    adapter = LoraAdapter(r=8, alpha=16, dropout=dropout, target_modules=TARGETS)
    torch.manual_seed(0)
    model = load_policy(model_dir, adapter, CPU)
    if trained_adapter:  # as after an SFT stage: LoRA B is no longer zero, so dropout changes outputs
        _perturb(model, 0.05)
    save_policy_weights(model, work_dir / "start")
    ctx = StageContext(
        stage=stage, stage_index=1, seed=5, adapter=adapter, tokenizer=load_tokenizer(model_dir),
        train_records=train, eval_records=eval_records, device=CPU, work_dir=work_dir,
        reference=ReferencePolicy(work_dir / "start", adapter, CPU),
    )
    return model, ctx


def _perturb(model: torch.nn.Module, scale: float) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=generator))


def dpo_stage(**overrides) -> DPOStage:
    values = dict(method="dpo", datasets=[{"id": "p"}], max_steps=15, learning_rate=1e-2, batch_size=8,
                  beta=0.1, max_seq_len=64, eval_dataset="p_eval", eval_every_steps=5)
    return DPOStage(**{**values, **overrides})


@pytest.mark.slow
def test_dpo_learns_the_preference_against_the_stage_start_reference(tiny_model_dir: Path,
                                                                      tmp_path: Path) -> None:
    stage = dpo_stage()
    train, held_out = preference_records(32), preference_records(16, 100)
    model, ctx = _context(tiny_model_dir, stage, train, held_out, tmp_path)
    method = DPOMethod(ctx)
    reporter = RecordingReporter()
    outcome = train_stage(model, method, stage, stage_index=1, stage_folder=tmp_path / "stage-1",
                          tokenizer=ctx.tokenizer, checkpoints=CheckpointPolicy(None, 1), reporter=reporter,
                          device=CPU, manifest_config={})
    assert outcome.status == "finished"
    # Step 1 runs the untouched stage-start policy: its implicit rewards are exactly zero.
    assert reporter.train_series("rewards/chosen")[0] == pytest.approx(0.0, abs=1e-5)
    assert reporter.train_series("rewards/margins")[0] == pytest.approx(0.0, abs=1e-5)
    assert "reference" in model.peft_config and model.active_adapter == "default"
    final = outcome.final_metrics
    print(f"DPO eval accuracy {final['eval_rewards/accuracies']:.2f}, "
          f"margin {final['eval_rewards/margins']:.3f}, eval_loss {final['eval_loss']:.3f}")
    assert final["eval_rewards/accuracies"] > 0.9
    assert min(reporter.train_series("rewards/accuracies")[-3:]) > 0.9
    assert final["eval_loss"] < 0.6931  # below -log(sigmoid(0)): the preference was learnt


def test_reference_log_probs_are_cached_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, ctx = _context(tiny_model_dir, dpo_stage(), preference_records(8), [], tmp_path)
    method = DPOMethod(ctx)
    method.setup(model, ctx.tokenizer)
    cached = method._ref["train"]
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)  # the policy moves; the cached reference must not
    method.setup(model, ctx.tokenizer)
    assert torch.equal(method._ref["train"][0], cached[0]) and torch.equal(method._ref["train"][1], cached[1])
    assert method.evaluate(model) is None


def test_pairs_all_truncated_away_is_a_user_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    _, ctx = _context(tiny_model_dir, dpo_stage(max_seq_len=8, truncation="drop"), preference_records(4), [],
                      tmp_path)
    with pytest.raises(TrainingDataError, match="dropped by truncation"):
        DPOMethod(ctx)


def test_dpo_step_one_margins_are_zero_with_lora_dropout(tiny_model_dir: Path, tmp_path: Path) -> None:
    # The policy starts equal to the reference; with its LoRA dropout on (and none in the
    # reference) the step-1 margins were not 0. Dropout is off by default, as in TRL.
    stage = dpo_stage(max_steps=1, eval_every_steps=None, eval_dataset=None)
    model, ctx = _context(tiny_model_dir, stage, preference_records(8), [], tmp_path, dropout=0.3,
                          trained_adapter=True)
    reporter = RecordingReporter()
    train_stage(model, DPOMethod(ctx), stage, stage_index=1, stage_folder=tmp_path / "stage-1",
                tokenizer=ctx.tokenizer, checkpoints=CheckpointPolicy(None, 1), reporter=reporter, device=CPU,
                manifest_config={})
    assert reporter.train_series("rewards/margins")[0] == pytest.approx(0.0, abs=1e-5)
    assert reporter.train_series("rewards/chosen")[0] == pytest.approx(0.0, abs=1e-5)


def test_ipo_uses_log_probs_averaged_over_tokens(tiny_model_dir: Path, tmp_path: Path) -> None:
    # IPO's target margin 1/(2 beta) is on token-averaged log-probs (paper, TRL); with sums it
    # depended on completion length.
    stage = dpo_stage(loss_type="ipo", beta=0.5)
    model, ctx = _context(tiny_model_dir, stage, preference_records(4), [], tmp_path)
    method = DPOMethod(ctx)
    method.setup(model, ctx.tokenizer)
    _perturb(model, 0.05)  # policy != reference, so the margins are not 0
    batch = method.micro_batches(model, 1)[0]
    with torch.no_grad():
        out = method.loss(model, batch, 1)
        counts = (batch.labels != IGNORE_INDEX).sum(dim=1)
        logps = sequence_logps(model, batch.inputs, batch.labels) / counts
        n = batch.ref_chosen.shape[0]
        ref_chosen, ref_rejected = batch.ref_chosen / counts[:n], batch.ref_rejected / counts[n:]
        expected, _ = dpo_loss(logps[:n], logps[n:], ref_chosen, ref_rejected, beta=0.5, loss_type="ipo",
                               reduction="sum")
    assert counts[:n].tolist() != counts[n:].tolist()  # chosen and rejected lengths differ
    torch.testing.assert_close(out.loss, expected)
