"""The fit estimate against tensor bytes measured on CPU, and its verdicts on model shapes it cannot hold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.unit.trainer_core.factories import sft_stage
from trainer_core.config import RunSpec
from trainer_core.estimate import EstimateError, ModelShape, estimate_fit
from trainer_core.losses.sft import sft_loss_from_hidden
from trainer_core.modeling import head_inputs, load_policy

BATCH, SEQ = 4, 64
LLAMA_8B = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False}


def _spec(adapter: dict[str, Any], gpus: int = 1, gradient_checkpointing: bool | None = None,
          **stage: Any) -> RunSpec:
    fields = {"batch_size": BATCH, "max_seq_len": SEQ, "gradient_accumulation": 1, "eval_fraction": 0.0,
              "eval_every_steps": None, **stage}
    return RunSpec.model_validate({
        "base_model": "tiny", "adapter": adapter, "resources": {"gpus": gpus},
        "gradient_checkpointing": gradient_checkpointing,
        "stages": [sft_stage(**fields)],
        "export": ["merged"] if adapter["type"] == "full" else ["adapter"],
    })


def _tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _measure(model_dir: Path, spec: RunSpec) -> dict[str, int]:
    """Returns the bytes of weights, gradients, AdamW state and saved activations of one SFT step."""
    torch.manual_seed(0)
    model = load_policy(model_dir, spec.adapter, torch.device("cpu"))
    model.train()
    ids = torch.randint(5, 500, (BATCH, SEQ))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = head_inputs(model, {"input_ids": ids})
        loss, _ = sft_loss_from_hidden(out.hidden, out.head, ids, vocab=out.vocab, reduction="sum")
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable)
    optimizer.step()
    return {
        "weights": _tensor_bytes(model.parameters()),
        "gradients": _tensor_bytes(p.grad for p in trainable),
        "optimizer": _tensor_bytes(v for state in optimizer.state.values() for k, v in state.items()
                                   if k != "step"),
        "saved": sum(saved.values()),
    }


@pytest.mark.parametrize("adapter", [
    {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
    {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    {"type": "full"},
], ids=["lora", "lora-dropout-some-targets", "full"])
@pytest.mark.parametrize("model", ["tiny_model_dir", "tiny_teacher_dir"])
def test_estimate_matches_measured_tensor_bytes(adapter: dict[str, Any], model: str,
                                                request: pytest.FixtureRequest) -> None:
    model_dir: Path = request.getfixturevalue(model)
    spec = _spec(adapter)
    config = json.loads((model_dir / "config.json").read_text())
    memory = estimate_fit(spec, config, device="cpu").stages[0].memory
    measured = _measure(model_dir, spec)

    # Weights, gradients and optimizer moments are counted exactly.
    assert memory.weights == measured["weights"]
    assert memory.gradients == measured["gradients"]
    assert memory.optimizer == measured["optimizer"]
    # What the backward keeps: the activations plus one fp32 copy of the logits (the estimate's
    # second copy is the log-softmax, alive only while the loss is computed).
    kept = memory.activations + memory.logits // 2
    assert kept == pytest.approx(measured["saved"], rel=0.1)


def test_full_finetune_of_an_8b_model_needs_more_than_a_24gb_device() -> None:
    spec = _spec({"type": "full"}, max_seq_len=2048)
    estimate = estimate_fit(spec, LLAMA_8B)
    assert estimate.total_params == pytest.approx(8.03e9, rel=0.01)
    # fp32 weights, gradients and two AdamW moments: 16 bytes per parameter, about 128 GB.
    assert estimate.peak_memory_bytes_per_device > 128e9
    lora = estimate_fit(_spec({"type": "lora", "r": 16}, max_seq_len=512, batch_size=1), LLAMA_8B)
    assert lora.peak_memory_bytes_per_device < 24e9


def test_more_devices_shard_the_weights_and_the_batch() -> None:
    one = estimate_fit(_spec({"type": "full"}), LLAMA_8B)
    four = estimate_fit(_spec({"type": "full"}, gpus=4), LLAMA_8B)
    assert four.stages[0].memory.optimizer == pytest.approx(one.stages[0].memory.optimizer / 4, rel=1e-6)
    assert four.stages[0].memory.activations == pytest.approx(one.stages[0].memory.activations / 4, rel=1e-6)
    assert four.tokens_per_step == one.tokens_per_step
    assert four.step_seconds == pytest.approx(one.step_seconds / 4)


def test_a_config_without_sizes_is_refused() -> None:
    with pytest.raises(EstimateError, match="hidden_size"):
        ModelShape.from_config({"vocab_size": 10})


def test_gradient_checkpointing_keeps_layer_inputs_only() -> None:
    plain = estimate_fit(_spec({"type": "lora"}, max_seq_len=2048, gradient_checkpointing=False), LLAMA_8B)
    checkpointed = estimate_fit(_spec({"type": "lora"}, max_seq_len=2048), LLAMA_8B)  # on by default on CUDA
    assert checkpointed.stages[0].memory.activations < plain.stages[0].memory.activations / 10


def test_qlora_holds_the_base_in_four_bits_and_stays_on_one_device() -> None:
    lora = estimate_fit(_spec({"type": "lora"}), LLAMA_8B).stages[0].memory.weights
    qlora = estimate_fit(_spec({"type": "qlora"}), LLAMA_8B).stages[0].memory.weights
    assert 0.25 < qlora / lora < 0.4  # 4-bit layers, bf16 embeddings and head
    with pytest.raises(ValueError, match="qlora' trains on one device"):
        _spec({"type": "qlora"}, gpus=2)
