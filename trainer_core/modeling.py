"""Loading the policy (base model + LoRA or full fine-tuning), its tokenizer and its frozen reference."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from trainer_core.config import Adapter, FullAdapter, LoraAdapter
from trainer_core.data import IGNORE_INDEX
from trainer_core.staging import staged_folder

POLICY_ADAPTER = "default"
REFERENCE_ADAPTER = "reference"


def choose_device(device: str = "auto") -> torch.device:
    """Returns the torch device for a device string ("auto" picks CUDA when present)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def base_dtype(adapter: Adapter, device: torch.device) -> torch.dtype:
    """Returns the dtype to hold frozen base weights in.

    LoRA on GPU keeps the frozen base in bf16 (half the memory; autocast computes in bf16 anyway)
    while the trainable LoRA weights stay fp32. Full fine-tuning keeps fp32 master weights, and CPU
    runs stay fp32 throughout (bf16 matmuls are slow on most CPUs and break exact-resume tests).
    """
    if device.type == "cuda" and isinstance(adapter, LoraAdapter):
        return torch.bfloat16
    return torch.float32


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """Returns the tokenizer saved in a model folder, with a pad token guaranteed."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(model_dir: Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Returns a causal LM loaded from a folder (sdpa attention: it honours 4D packing masks)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    return model.to(device)


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
    base = load_base_model(base_model_dir, base_dtype(adapter, device), device)
    if start_dir is not None:
        return PeftModel.from_pretrained(base, start_dir, adapter_name=POLICY_ADAPTER, is_trainable=True)
    lora = LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=adapter.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, lora, adapter_name=POLICY_ADAPTER)


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


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Returns the parameters that train, by name (LoRA weights, or everything for full FT)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def output_projection(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """Returns (backbone, lm_head) when logits are the head applied position-wise to the backbone output.

    Lets losses project only the positions they need instead of computing full-vocabulary logits
    everywhere. The head may be LoRA-wrapped. None when the model post-processes logits after
    the head (soft-capping, logit scaling), in which case callers use the full forward.
    """
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


def label_logits(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Returns logits [N, V] at the N positions whose label is not IGNORE_INDEX, in row-major order.

    ``labels`` [B, T] are already shifted (``labels[:, t]`` is the target of position t, as
    ``trainer_core.data.packing`` builds them). Only those positions go through the LM head:
    prompt, padding and packing-boundary tokens never get full-vocabulary logits (with a small
    model the head is a large share of the FLOPs).
    """
    keep = labels != IGNORE_INDEX
    parts = output_projection(model)
    if parts is None:
        return model(**inputs).logits[keep]
    backbone, head = parts
    return head(backbone(**inputs).last_hidden_state[keep])


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
                        self._frozen = load_base_model(self.start_dir, torch.float32, self.device)
                        self._frozen.requires_grad_(False).eval()
                    yield self._frozen
        finally:
            if isinstance(model, PeftModel):
                # set_adapter re-enables grads on the policy adapter and freezes the reference.
                model.set_adapter(POLICY_ADAPTER)
            model.train(was_training)

