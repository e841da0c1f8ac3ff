"""Will a run fit, and how long will a step take: per-device peak memory and step time from the base
model's ``config.json`` and the run spec, before anything is loaded.

Imports without torch (the API computes it at submit). What it counts, per device, for the stage
that needs the most:

- weights: the frozen base at the dtype the trainer loads it in (bf16 for LoRA on GPU, fp32
  otherwise: ``trainer_core.modeling.base_dtype``; 4-bit for QLoRA, with embeddings and head in
  bf16), trainable weights in fp32; with N devices FSDP2 shards them N ways and adds the gathered
  layer and root it computes with;
- gradients (fp32, trainable weights only) and AdamW's two fp32 moments, sharded the same way;
- activations kept for the backward of one micro-batch share, per token per decoder layer (the
  saved tensors of a Llama-style layer counted op by op: norms, q/k/v, attention output, the
  gated MLP, LoRA's low-rank outputs and dropout copies) — with gradient checkpointing (the run's
  setting; by default on for CUDA) only each layer's input plus one layer's worth; and the
  full-vocabulary logits with their log-softmax at the trained positions, or one chunk of them
  when that is smaller (``trainer_core.losses.chunked``; a sharded model's root forward
  materialises all positions' logits first);
- the frozen reference of DPO/PPO/GRPO (a second LoRA adapter, or a whole frozen copy for full
  fine-tuning, bf16 on GPU) and, for rollout methods, the generation KV cache.

Step time is FLOPs (6 per parameter per token for full fine-tuning, 4 with frozen base weights,
plus attention) over the devices' peak throughput at an assumed utilisation. ``bench/gpu_check.py``
compares the memory figure with ``torch.cuda.max_memory_allocated``; the unit test with the tensor
bytes measured on CPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from trainer_core.config import FullAdapter, GRPOStage, LoraAdapter, QLoraAdapter, RunSpec, StageBase

DeviceKind = Literal["cuda", "cpu"]

# Linear layers of a Llama-style decoder layer, as peft's "all-linear" finds them (lm_head excluded).
LAYER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REFERENCE_METHODS = ("dpo", "ppo", "grpo")
ROLLOUT_METHODS = ("ppo", "grpo")
# Dense bf16 peak FLOP/s by device name fragment (vendor data sheets); others use the default.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40": 181e12, "4090": 165e12,
              "A10": 125e12, "L4": 121e12, "V100": 125e12, "T4": 65e12}
DEFAULT_PEAK_FLOPS = {"cuda": 200e12, "cpu": 0.5e12}
# Model FLOPs utilisation a training step reaches on a good day.
ASSUMED_UTILISATION = 0.35
# trainer_core.losses.chunked.CHUNK_ELEMENTS (not imported: that module needs torch): the fp32
# logits the losses hold at once when the trained positions' logits would be larger.
LOGITS_CHUNK_ELEMENTS = 1 << 25
# bitsandbytes 4-bit: half a byte per weight plus the quantisation constants (one fp32 absmax per
# 64 weights, or 8 bits per 64 with double quantisation and a small second-level table).
QLORA_BYTES_PER_PARAM = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}


class EstimateError(ValueError):
    """The model config lacks what the estimate needs (not a Llama-style decoder)."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer, read from its config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied_embeddings: bool
    num_experts: int = 1

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        """Returns the shape of a transformers config dict; raises EstimateError when a size is missing."""
        config = config.get("text_config", config)  # multimodal configs nest the language model
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            return cls(
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(config.get("moe_intermediate_size") or config["intermediate_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                tied_embeddings=bool(config.get("tie_word_embeddings", False)),
                num_experts=int(config.get("num_local_experts") or config.get("num_experts") or 1),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EstimateError(f"config.json lacks a size the fit estimate needs ({exc})") from exc

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Returns (in, out) features of each linear layer of one decoder layer."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        h, i = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_params(self) -> int:
        """Returns one decoder layer's parameters (every expert's MLP, two norms)."""
        sizes = {name: a * b for name, (a, b) in self.linear_shapes().items()}
        mlp = sizes.pop("gate_proj") + sizes.pop("up_proj") + sizes.pop("down_proj")
        return sum(sizes.values()) + mlp * self.num_experts + 2 * self.hidden_size

    def root_params(self) -> int:
        """Returns the parameters outside the decoder layers: embeddings, final norm, LM head."""
        embeddings = self.vocab_size * self.hidden_size
        return embeddings * (1 if self.tied_embeddings else 2) + self.hidden_size

    def total_params(self) -> int:
        return self.num_layers * self.layer_params() + self.root_params()


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per device by what holds them."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    reference: int
    generation: int

    @property
    def total(self) -> int:
        return sum(asdict(self).values())


@dataclass(frozen=True)
class StageEstimate:
    stage_index: int
    method: str
    peak_memory_bytes_per_device: int
    memory: MemoryBreakdown
    tokens_per_step: int
    step_seconds: float


@dataclass(frozen=True)
class FitEstimate:
    """The estimate of a whole run: its most demanding stage's peak and each stage's figures."""

    devices: int
    device_kind: DeviceKind
    total_params: int
    trainable_params: int
    peak_memory_bytes_per_device: int
    tokens_per_step: int
    step_seconds: float
    stages: list[StageEstimate] = field(default_factory=list)
    assumptions: str = ""

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for stage, source in zip(out["stages"], self.stages, strict=True):
            stage["memory"]["total"] = source.memory.total
        return out


def _lora_targets(adapter: LoraAdapter, shape: ModelShape) -> tuple[dict[str, tuple[int, int]], bool]:
    """Returns (the targeted linear layers of one decoder layer, whether lm_head is targeted)."""
    layer = shape.linear_shapes()
    if adapter.target_modules == "all-linear":
        return layer, False
    names = set(adapter.target_modules)
    return {n: s for n, s in layer.items() if n in names}, "lm_head" in names


def lora_params(adapter: LoraAdapter, shape: ModelShape) -> int:
    """Returns the trainable parameters of a LoRA adapter: r × (in + out) per targeted layer."""
    targets, head = _lora_targets(adapter, shape)
    per_layer = sum(adapter.r * (a + b) for a, b in targets.values())
    return shape.num_layers * per_layer + (adapter.r * (shape.hidden_size + shape.vocab_size) if head else 0)


def activation_elements_per_token(spec: RunSpec, shape: ModelShape) -> float:
    """Returns the elements one token keeps for the backward, over all decoder layers.

    Counted from the saved tensors of a Llama-style layer: always the two norms' inputs and
    scales, q, k, v and the attention output (2 q + 2 kv), one log-sum-exp per head, the gated MLP's
    gate, activation and up outputs (3 i). A linear layer's input is kept only when its weights
    train: the norm outputs feeding q/k/v and gate/up, the input of o_proj (q) and of down_proj (i).
    LoRA adds each target's r-wide low-rank output and, with dropout, a dropped copy of its input
    and the mask; full fine-tuning adds the norms' normalised inputs for their weight gradients.
    """
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    adapter = spec.adapter
    full = isinstance(adapter, FullAdapter)
    linears = shape.linear_shapes()
    targets, head = (linears, True) if full else _lora_targets(adapter, shape)  # type: ignore[arg-type]
    trained_inputs = {"attention_in": h if {"q_proj", "k_proj", "v_proj"} & set(targets) else 0,
                      "o_proj": q if "o_proj" in targets else 0,
                      "mlp_in": h if {"gate_proj", "up_proj"} & set(targets) else 0,
                      "down_proj": i if "down_proj" in targets else 0}
    per_layer = 2 * h + 2 + 2 * q + 2 * kv + shape.num_heads + 3 * i + sum(trained_inputs.values())
    if full:
        per_layer += 3 * h
    else:
        per_layer += adapter.r * len(targets)
        if adapter.dropout > 0:
            per_layer += 1.25 * sum(a for a, _ in targets.values())
    # Rotary cos/sin, the token ids (int64), and the head's input when the head trains.
    outside = 2 * shape.head_dim + 2 + (h if head else 0)
    return shape.num_layers * per_layer + outside


def _rows_per_micro_batch(stage: StageBase) -> int:
    # DPO runs chosen and rejected through one forward.
    return stage.batch_size * (2 if stage.method == "dpo" else 1)


def _stage_estimate(spec: RunSpec, index: int, shape: ModelShape, device: DeviceKind, devices: int,
                    peak_flops: float, trainable: int) -> StageEstimate:
    stage = spec.stages[index]
    full = isinstance(spec.adapter, FullAdapter)
    base_bytes = 2 if device == "cuda" and not full else 4
    act_bytes = 2 if device == "cuda" else 4
    total = shape.total_params()
    frozen_bytes = 0.0 if full else total * base_bytes
    if isinstance(spec.adapter, QLoraAdapter):
        layers = shape.num_layers * shape.layer_params()
        frozen_bytes = (layers * QLORA_BYTES_PER_PARAM[spec.adapter.double_quant]
                        + shape.root_params() * base_bytes)
    weights = (frozen_bytes + trainable * 4) / devices
    if devices > 1:
        # FSDP2 gathers one decoder layer at a time (and prefetches the next) plus the root, which
        # stays gathered through the forward.
        gathered = (2 * shape.layer_params() + shape.root_params()) * base_bytes
        weights += gathered
    gradients = trainable * 4 / devices
    optimizer = 2 * trainable * 4 / devices
    rows = math.ceil(_rows_per_micro_batch(stage) / devices)
    tokens = rows * stage.max_seq_len
    per_token = activation_elements_per_token(spec, shape)
    checkpointing = device == "cuda" if spec.gradient_checkpointing is None else spec.gradient_checkpointing
    if checkpointing:
        # Each layer keeps its input; the backward recomputes one layer's activations at a time.
        per_token = shape.num_layers * shape.hidden_size + per_token / shape.num_layers
    activations = tokens * per_token * act_bytes
    # Logits and their log-softmax in fp32 (the losses upcast them): all trained positions at once,
    # or one chunk when that is smaller.
    logits = min(tokens * shape.vocab_size, LOGITS_CHUNK_ELEMENTS) * 4 * 2
    if devices > 1:
        logits += tokens * shape.vocab_size * act_bytes
    reference = 0
    # GRPO with beta 0 never runs its reference.
    if stage.method in REFERENCE_METHODS and not (isinstance(stage, GRPOStage) and stage.beta == 0):
        # Full fine-tuning's reference is a whole frozen copy (bf16 on CUDA: modeling.frozen_dtype).
        reference = total * act_bytes if full else trainable * 4
    generation = 0
    if stage.method in ROLLOUT_METHODS:
        kv = shape.num_kv_heads * shape.head_dim
        generation = 2 * shape.num_layers * kv * act_bytes * stage.batch_size * stage.max_seq_len
    memory = MemoryBreakdown(round(weights), round(gradients), round(optimizer), round(activations),
                             round(logits), round(reference), round(generation))
    tokens_per_step = _rows_per_micro_batch(stage) * stage.gradient_accumulation * stage.max_seq_len
    # Forward 2 and backward 4 FLOPs per weight per token (2 without weight gradients), plus attention.
    attention = 6 * shape.num_layers * shape.hidden_size * stage.max_seq_len
    flops_per_token = (6 if full else 4) * total + attention
    step_seconds = flops_per_token * tokens_per_step / (devices * peak_flops * ASSUMED_UTILISATION)
    return StageEstimate(index, stage.method, memory.total, memory, tokens_per_step, step_seconds)


def peak_flops_for(device_name: str | None, device: DeviceKind) -> float:
    """Returns the dense bf16 peak FLOP/s of a device by its name (a default when unknown)."""
    for fragment, flops in PEAK_FLOPS.items():
        if device_name and fragment in device_name:
            return flops
    return DEFAULT_PEAK_FLOPS[device]


def estimate_fit(spec: RunSpec, config: dict[str, Any], *, device: DeviceKind = "cuda",
                 device_name: str | None = None) -> FitEstimate:
    """Returns the per-device peak memory and step time of ``spec`` on ``resources.gpus`` devices.

    Token counts are upper bounds: every sequence is taken at ``max_seq_len`` (packing and short
    records only lower them). Raises EstimateError for a config without the sizes it needs.
    """
    shape = ModelShape.from_config(config)
    devices = spec.resources.gpus
    adapter = spec.adapter
    trainable = shape.total_params() if isinstance(adapter, FullAdapter) else lora_params(adapter, shape)
    peak_flops = peak_flops_for(device_name, device)
    stages = [_stage_estimate(spec, i, shape, device, devices, peak_flops, trainable)
              for i in range(len(spec.stages))]
    worst = max(stages, key=lambda s: s.peak_memory_bytes_per_device)
    return FitEstimate(
        devices=devices, device_kind=device, total_params=shape.total_params(), trainable_params=trainable,
        peak_memory_bytes_per_device=worst.peak_memory_bytes_per_device,
        tokens_per_step=max(s.tokens_per_step for s in stages),
        step_seconds=max(s.step_seconds for s in stages),
        stages=stages,
        assumptions=(f"every sequence at max_seq_len; {ASSUMED_UTILISATION:.0%} of "
                     f"{peak_flops / 1e12:.0f} TFLOP/s per device"),
    )
