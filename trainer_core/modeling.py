"""Loading the policy (base model + LoRA or full fine-tuning), its tokenizer and its frozen reference."""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from torch.distributed.fsdp import FSDPModule
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from trainer_core.config import Adapter, FullAdapter, LoraAdapter, QLoraAdapter
from trainer_core.distributed import reshard
from trainer_core.errors import TrainingDataError
from trainer_core.model_folders import missing_target_modules
from trainer_core.staging import staged_folder

POLICY_ADAPTER = "default"
REFERENCE_ADAPTER = "reference"


def choose_device(device: str = "auto") -> torch.device:
    """Returns the torch device for a device string ("auto" picks CUDA when present)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def base_dtype(adapter: Adapter, device: torch.device) -> torch.dtype:
    """Returns the dtype to hold the policy's base weights in.

    LoRA on GPU keeps the frozen base in bf16 (half the memory; autocast computes in bf16 anyway)
    while the trainable LoRA weights stay fp32 (QLoRA's base is 4-bit, its compute dtype bf16).
    Full fine-tuning keeps fp32 master weights under bf16 autocast: 4 bytes of weight + 4 of
    gradient + 8 of AdamW state = 16 bytes per parameter (a 0.5B model: 8 GB; an 8B model does
    not fit one 80 GB GPU this way, which is what LoRA/QLoRA are for). CPU runs stay fp32
    throughout (bf16 matmuls are slow on most CPUs and break exact-resume tests).
    """
    if device.type == "cuda" and isinstance(adapter, LoraAdapter):
        return torch.bfloat16
    return torch.float32


def frozen_dtype(device: torch.device) -> torch.dtype:
    """Returns the dtype of models that never train (SAD teacher, full fine-tuning's reference).

    bf16 on CUDA: they only run forward passes, which autocast computes in bf16 anyway.
    """
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """Returns the tokenizer saved in a model folder, with a pad token guaranteed."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    model_dir: Path, dtype: torch.dtype, device: torch.device, quantize: QLoraAdapter | None = None
) -> nn.Module:
    """Returns a causal LM loaded from a folder (sdpa attention: it honours 4D packing masks).

    ``quantize``: load the linear layers (not the LM head or embeddings) as 4-bit bitsandbytes
    weights, computing in ``dtype``.
    """
    if quantize is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
        return model.to(device)
    if not quantization_available():
        raise TrainingDataError(
            "adapter.type 'qlora' needs the bitsandbytes package on the worker; install it or use 'lora'"
        )
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quantize.quant_type,
        bnb_4bit_use_double_quant=quantize.double_quant, bnb_4bit_compute_dtype=dtype,
    )
    placement = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="sdpa", quantization_config=config, device_map=placement
    )
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            # On AVX512-BF16 CPUs bitsandbytes repacks the 4-bit weights in place at the first
            # eval-mode forward and computes in bf16 from then on: evaluation would change the
            # numbers of every later training step (and break exact resume). One kernel throughout.
            module.support_avx512bf16_for_cpu = False
    return model


PackedAttention = Literal["dense_mask", "flash_varlen", "flex"]


def packed_attention(device: torch.device) -> PackedAttention:
    """Returns how packed rows keep their sequences apart on ``device``.

    - ``flash_varlen``: CUDA with the flash-attn package: one padding-free row, flash-attention's
      varlen kernel finds the sequences from the restarting ``position_ids``.
    - ``flex``: CUDA without flash-attn: one padding-free row and PyTorch's flex attention with a
      block-sparse document mask (``document_mask``).
    - ``dense_mask``: CPU: a [B, 1, L, L] block-diagonal mask under SDPA, rows no longer than the
      micro-batch's longest example. Flex attention has no backward pass on CPU (torch 2.13) and
      position_ids alone do not separate sequences under SDPA (REFERENCE "Packing").
    Neither CUDA path was ever run in this project (no GPU in its tests).
    """
    if device.type != "cuda":
        return "dense_mask"
    return "flash_varlen" if importlib.util.find_spec("flash_attn") is not None else "flex"


ATTENTION_IMPLEMENTATION: dict[str, str] = {
    "dense_mask": "sdpa", "flash_varlen": "flash_attention_2", "flex": "flex_attention",
}


def use_attention(model: nn.Module, implementation: str) -> None:
    """Switches the model's attention implementation (the model is rebuilt per stage, so it stays)."""
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    inner.set_attn_implementation(implementation)


def document_mask(seq_lengths: torch.Tensor, device: torch.device) -> Any:
    """Returns flex attention's causal block mask keeping each of ``seq_lengths``'s sequences apart."""
    from torch.nn.attention.flex_attention import create_block_mask

    lengths = seq_lengths.to(device).long()
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)

    def causal_within(batch: Any, head: Any, query: Any, key: Any) -> Any:
        return (doc[query] == doc[key]) & (query >= key)

    total = int(seq_lengths.sum())
    return create_block_mask(causal_within, None, None, total, total, device=str(device))


def quantization_available() -> bool:
    """Returns whether bitsandbytes (4-bit weights for QLoRA) can be imported here."""
    return importlib.util.find_spec("bitsandbytes") is not None


def dequantized_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Returns the float32 weights of every 4-bit linear layer of ``model``, by plain-model module name.

    These are the weights a QLoRA adapter was trained against; empty for an unquantised model.
    """
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    out: dict[str, torch.Tensor] = {}
    for name, module in inner.named_modules():
        weight = getattr(module, "weight", None)
        if getattr(weight, "quant_state", None) is None:
            continue
        import bitsandbytes.functional as bnb_functional

        plain = name.removesuffix(".base_layer")
        out[plain] = bnb_functional.dequantize_4bit(weight.data, weight.quant_state).float().cpu()
    return out


def set_gradient_checkpointing(model: nn.Module, enabled: bool | None, device: torch.device) -> bool:
    """Returns whether activation checkpointing is on after applying the run's setting to ``model``.

    ``None`` means on for CUDA (activations of long rows dominate GPU memory) and off on CPU
    (where memory is plentiful and the recompute costs a third more time). Non-reentrant
    checkpointing: it needs no ``requires_grad`` input (frozen embeddings under LoRA), works with
    the LoRA dropout (RNG state is replayed on recompute) and gives the same gradients.
    """
    on = device.type == "cuda" if enabled is None else enabled
    if on:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.activation_checkpointing_disable()
    return on


def load_policy(
    base_model_dir: Path, adapter: Adapter, device: torch.device, start_dir: Path | None = None
) -> nn.Module:
    """Returns the trainable policy: base + LoRA adapter, or the full model for full fine-tuning.

    ``start_dir`` (written by ``save_policy_weights``) holds the weights a later stage or a resume
    starts from; without it a fresh LoRA adapter is initialised (seed the RNG first).
    """
    if isinstance(adapter, FullAdapter):
        model = load_base_model(start_dir or base_model_dir, torch.float32, device)
        model.requires_grad_(True)
        return model
    quantize = adapter if isinstance(adapter, QLoraAdapter) else None
    base = load_base_model(base_model_dir, base_dtype(adapter, device), device, quantize)
    if start_dir is not None:
        return PeftModel.from_pretrained(base, start_dir, adapter_name=POLICY_ADAPTER, is_trainable=True)
    lora = LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=adapter.target_modules,
        task_type="CAUSAL_LM",
    )
    if isinstance(adapter.target_modules, list):
        # peft ignores a target that matches nothing as long as another one matches.
        linear = {name for name, module in base.named_modules()
                  if getattr(getattr(module, "weight", None), "ndim", 0) == 2}
        if missing := missing_target_modules(adapter.target_modules, linear):
            raise TrainingDataError(f"adapter.target_modules: the base model has no module {missing[0]!r}")
    try:
        return get_peft_model(base, lora, adapter_name=POLICY_ADAPTER)
    except ValueError as exc:  # peft refuses a target it cannot adapt (a norm layer, say)
        raise TrainingDataError(f"adapter.target_modules: {exc}") from exc


def save_policy_weights(model: nn.Module, out_dir: Path) -> None:
    """Writes the policy's weights (LoRA adapter, or the full model) so ``load_policy`` restarts from them.

    Written under a temporary name and renamed, so a crash never leaves a half-written folder.
    """
    with staged_folder(out_dir) as tmp:
        if isinstance(model, PeftModel):
            model.save_pretrained(tmp, selected_adapters=[POLICY_ADAPTER], save_embedding_layers=False)
        else:
            model.save_pretrained(tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)


def disable_dropout(model: nn.Module) -> None:
    """Sets every dropout of ``model`` to 0 (LoRA dropout included), as TRL does for RL and DPO.

    Methods that compare the policy with itself or with a dropout-free reference (PPO's ratio to
    its rollout's log-probs, DPO's margins against the reference) must see the same function in
    both forwards: train mode may then differ from eval mode in nothing else.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        # Attention dropout is applied functionally from a float attribute (e.g. Llama, Qwen2).
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Returns the parameters that train, by name (LoRA weights, or everything for full FT)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def output_projection(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """Returns (backbone, lm_head) when logits are the head applied position-wise to the backbone output.

    Lets losses project only the positions they need instead of computing full-vocabulary logits
    everywhere. The head may be LoRA-wrapped. None when the model post-processes logits after
    the head (soft-capping, logit scaling), in which case callers use the full forward. None for an
    FSDP-sharded model too: its root's weights (embeddings, final norm, head) are only gathered by
    the root's own forward.
    """
    if isinstance(model, FSDPModule):
        return None
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    backbone = getattr(inner, inner.base_model_prefix, None)
    head = inner.get_output_embeddings()
    rescaled = any(
        getattr(inner.config, name, None) not in (None, 1.0)
        for name in ("final_logit_softcapping", "logit_scale", "logits_scaling")
    )
    if backbone is None or head is None or rescaled:
        return None
    return backbone, head


@dataclass(frozen=True)
class HeadInputs:
    """What the LM head is applied to, so losses can project a chunk of positions at a time.

    ``hidden`` [B, T, H]: the backbone's last hidden states; ``head`` maps them to ``vocab`` logits.
    ``head_weight``: the head's weight when it is a plain bias-free linear layer (fused kernels
    take it), else None. For a model that post-processes its logits (see ``output_projection``),
    ``hidden`` holds the logits themselves and ``head`` is the identity.
    """

    hidden: torch.Tensor
    head: Callable[[torch.Tensor], torch.Tensor]
    vocab: int
    head_weight: torch.Tensor | None


def head_inputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> HeadInputs:
    """Returns the backbone's output for ``inputs`` and the head that turns it into logits."""
    parts = output_projection(model)
    if parts is None:
        logits = model(**inputs).logits
        return HeadInputs(logits, nn.Identity(), logits.shape[-1], None)
    backbone, head = parts
    # A LoRA-wrapped or 4-bit head is not a plain linear layer: fused kernels would skip its adapter.
    plain = type(head) is nn.Linear and head.bias is None
    vocab = int(getattr(head, "out_features", 0) or model.config.get_text_config().vocab_size)
    return HeadInputs(backbone(**inputs).last_hidden_state, head, vocab, head.weight if plain else None)


def _rng_devices(device: torch.device) -> list[int]:
    """Returns the CUDA device indices whose RNG a fork must cover (none on CPU)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


class ReferencePolicy:
    """The frozen policy as it was when the stage began (DPO/PPO/GRPO reference).

    With LoRA it is a second, non-trainable adapter ("reference") loaded into the same model from
    the stage-start weights, so it costs only the adapter's memory. With full fine-tuning it is a
    separate frozen model loaded from the same folder. Loaded on first use: SFT and SAD never pay.
    """

    def __init__(self, start_dir: Path, adapter: Adapter, device: torch.device) -> None:
        self.start_dir = start_dir
        self.adapter = adapter
        self.device = device
        self._frozen: nn.Module | None = None

    @contextmanager
    def active(self, model: nn.Module) -> Iterator[nn.Module]:
        """Yields a module computing the reference's forward (eval, no grad); restores the policy after."""
        was_training = model.training
        try:
            with torch.no_grad():
                if isinstance(model, PeftModel):
                    if REFERENCE_ADAPTER not in model.peft_config:
                        # Creating adapter layers draws initial weights from the RNG; fork it so a
                        # lazy first load (straight run vs. resumed run) never shifts the dropout
                        # stream and exact resume holds.
                        with torch.random.fork_rng(devices=_rng_devices(self.device)):
                            model.load_adapter(
                                self.start_dir, adapter_name=REFERENCE_ADAPTER, is_trainable=False
                            )
                    model.eval()
                    model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
                    yield model
                else:
                    if self._frozen is None:
                        self._frozen = load_base_model(self.start_dir, frozen_dtype(self.device), self.device)
                        self._frozen.requires_grad_(False).eval()
                    yield self._frozen
        finally:
            if isinstance(model, PeftModel):
                # A sharded model's root keeps its gathered weights after a forward without backward;
                # put the sharded ones back first, or set_adapter would re-enable grads on the
                # gathered copies and leave the sharded policy weights frozen.
                reshard(model)
                # set_adapter re-enables grads on the policy adapter and freezes the reference.
                model.set_adapter(POLICY_ADAPTER)
            model.train(was_training)

