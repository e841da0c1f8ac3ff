"""Loads a resolved model (base, base + LoRA adapter, or merged folder) for in-process generation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from app.inference.types import ResolvedModel
from trainer_core.modeling import load_base_model, load_tokenizer

# For a config that states no context (rare): the size most small chat models were trained with.
DEFAULT_CONTEXT = 2048


@dataclass
class LocalModel:
    """A model ready to generate: weights in eval mode, its tokenizer and the ids that end a turn."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    eos_token_ids: tuple[int, ...]

    @property
    def size_bytes(self) -> int:
        """Returns the bytes held by the model's parameters and buffers."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def context_length(self) -> int:
        """Returns the most tokens (prompt and completion) the model attends over."""
        config = self.model.config
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            if isinstance(value := getattr(config, name, None), int) and value > 0:
                return value
        return DEFAULT_CONTEXT


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").exists() or (folder / "tokenizer.json").exists()


def _eos_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))


def load_local_model(resolved: ResolvedModel, device: torch.device) -> LocalModel:
    """Returns the model ``resolved`` names, loaded on ``device`` in eval mode.

    An adapter is loaded as base + ``PeftModel`` from the checkpoint folder and then merged, so
    decoding runs at the speed of a plain model (the merged copy is what the cache accounts).
    """
    if resolved.kind == "adapter":
        if resolved.checkpoint_path is None:
            raise ValueError(f"adapter model {resolved.id} has no checkpoint folder")
        base = load_base_model(resolved.base_path, torch.float32, device)
        model = PeftModel.from_pretrained(base, resolved.checkpoint_path).merge_and_unload()
        tokenizer_dir = (
            resolved.checkpoint_path if _has_tokenizer(resolved.checkpoint_path) else resolved.base_path
        )
    else:
        model = load_base_model(resolved.weights_path, torch.float32, device)
        tokenizer_dir = resolved.weights_path if _has_tokenizer(resolved.weights_path) else resolved.base_path
    model.requires_grad_(False).eval()
    tokenizer = load_tokenizer(tokenizer_dir)
    return LocalModel(model=model, tokenizer=tokenizer, eos_token_ids=_eos_ids(model, tokenizer))


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: list[dict] | str) -> list[int]:
    """Returns the prompt's token ids: a chat rendered with the model's template and the assistant
    header appended, or a text prompt encoded with the tokenizer's own special tokens."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    if not tokenizer.chat_template:
        raise ValueError("this model's tokenizer has no chat template; use /v1/completions instead")
    rendered = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    # The template writes its own special tokens (bos); encoding must not add them a second time.
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
