"""Gradient checkpointing and QLoRA: what they save must cost nothing in the numbers.

- checkpointing gives the same loss and gradients as without (1e-6), with LoRA (dropout on),
  QLoRA and full fine-tuning;
- a QLoRA run trains through run_pipeline, resumes exactly, and exports an adapter that loads
  over the plain base and a merged model built on the dequantised base (the manifest says so).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.unit.trainer_core.factories import TARGETS, run_spec, sft_rows, sft_stage, write_datasets
from trainer_core.config import FullAdapter, LoraAdapter, QLoraAdapter, SFTStage
from trainer_core.methods import build_method
from trainer_core.methods.base import StageContext
from trainer_core.modeling import (
    ReferencePolicy,
    load_policy,
    load_tokenizer,
    quantization_available,
    set_gradient_checkpointing,
    trainable_parameters,
)
from trainer_core.pipeline import run_pipeline
from trainer_core.reporting import RecordingReporter

CPU = torch.device("cpu")
needs_bnb = pytest.mark.skipif(not quantization_available(), reason="bitsandbytes is not installed")


def _loss_and_grads(model_dir: Path, adapter, checkpointing: bool, tmp_path: Path):
    torch.manual_seed(0)
    model = load_policy(model_dir, adapter, CPU)
    assert set_gradient_checkpointing(model, checkpointing, CPU) is checkpointing
    tokenizer = load_tokenizer(model_dir)
    stage = SFTStage.model_validate(sft_stage(batch_size=6, eval_fraction=0.0, eval_every_steps=None))
    ctx = StageContext(stage=stage, stage_index=0, seed=3, adapter=adapter, tokenizer=tokenizer,
                       train_records=[{**r, "format": "sft"} for r in sft_rows(12)], eval_records=[],
                       device=CPU, work_dir=tmp_path, reference=ReferencePolicy(tmp_path, adapter, CPU))
    method = build_method(ctx)
    model.train()
    torch.manual_seed(1)  # the LoRA dropout stream
    out = method.loss(model, method.micro_batches(model, 1)[0], 1)
    out.loss.backward()
    return out.loss.detach(), {name: p.grad.clone() for name, p in trainable_parameters(model).items()}


@pytest.mark.parametrize("adapter", [
    LoraAdapter(r=4, alpha=8, dropout=0.1, target_modules=TARGETS),
    pytest.param(QLoraAdapter(r=4, alpha=8, dropout=0.1, target_modules=TARGETS), marks=needs_bnb),
    FullAdapter(),
], ids=["lora", "qlora", "full"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(
    tiny_model_dir: Path, tmp_path: Path, adapter
) -> None:
    plain_loss, plain_grads = _loss_and_grads(tiny_model_dir, adapter, False, tmp_path)
    ckpt_loss, ckpt_grads = _loss_and_grads(tiny_model_dir, adapter, True, tmp_path)
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=0, atol=1e-6)
    assert plain_grads.keys() == ckpt_grads.keys()
    worst = max((plain_grads[k] - ckpt_grads[k]).abs().max().item() for k in plain_grads)
    assert worst <= 1e-6
    assert any(g.abs().sum() > 0 for g in plain_grads.values())


def test_gradient_checkpointing_defaults_to_cuda_only(tiny_model_dir: Path) -> None:
    model = load_policy(tiny_model_dir, LoraAdapter(r=2, target_modules=["q_proj"]), CPU)
    assert set_gradient_checkpointing(model, None, CPU) is False
    assert not model.is_activation_checkpointing
    assert set_gradient_checkpointing(model, True, CPU) is True
    assert model.is_activation_checkpointing


@needs_bnb
def test_qlora_run_resumes_exactly_and_exports_adapter_and_dequantised_merge(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    paths, formats = write_datasets(tmp_path)
    stage = sft_stage(max_steps=3, eval_every_steps=None, eval_fraction=0.0, gradient_accumulation=1)
    qlora = {"type": "qlora", "r": 4, "alpha": 8, "dropout": 0.1, "target_modules": TARGETS}
    spec = run_spec([stage], adapter=qlora)

    def run(work: Path, reporter: RecordingReporter):
        return run_pipeline(spec, base_model_path=tiny_model_dir, dataset_paths=paths,
                            dataset_formats=formats, work_dir=work, reporter=reporter, device="cpu")

    straight = RecordingReporter()
    result = run(tmp_path / "a", straight)
    assert result.status == "succeeded"
    stopped, resumed = RecordingReporter(stop_after_steps=2), RecordingReporter()
    assert [run(tmp_path / "b", r).status for r in (stopped, resumed)] == ["stopped", "succeeded"]
    losses = {step: v["loss"] for _, step, split, v in straight.metrics if split == "train"}
    again = {step: v["loss"] for r in (stopped, resumed)
             for _, step, split, v in r.metrics if split == "train"}
    assert again.keys() == losses.keys() == {1, 2, 3}
    assert max(abs(losses[k] - again[k]) for k in losses) <= 1e-6
    assert losses[3] < losses[1]
    a = load_file(str(tmp_path / "a/export/adapter/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b/export/adapter/adapter_model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6

    # The adapter loads with plain peft over the unquantised base; the merge used the 4-bit base.
    adapter_dir, merged_dir = result.exports["adapter"], result.exports["merged"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    over_plain = PeftModel.from_pretrained(base, adapter_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert json.loads((merged_dir / "manifest.json").read_text())["merged_base"] == "dequantized_4bit"
    quantized = load_policy(tiny_model_dir, spec.adapter, CPU, start_dir=adapter_dir).eval()
    ids = torch.tensor([load_tokenizer(tiny_model_dir)("Name colour 3.")["input_ids"]])
    with torch.no_grad():
        want = quantized(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
        # Over the original base the adapter is close but not equal: quantisation error.
        assert (over_plain(input_ids=ids).logits - want).abs().max() > 1e-4
