"""Reward models: the policy architecture with a scalar head that scores a whole sequence.

The score of a sequence is ``head(h_last)``: the final hidden state of its last real token through
a linear layer (hidden -> 1), as TRL's ``AutoModelForSequenceClassification`` reward models do.
The ``reward_model`` stage method trains it with the Bradley-Terry loss on preference pairs;
``export_reward_model`` writes a checkpoint of kind ``reward_model`` — a merged model folder (plain
``from_pretrained``) plus ``reward_head.safetensors`` — and ``load_reward_model_scorer`` reads one
back to score completions for PPO/GRPO (``{"type": "reward_model"}`` graders): batched, bf16 on GPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from trainer_core.checkpoint import export_merged
from trainer_core.data.packing import collate_padded
from trainer_core.data.render import render_response
from trainer_core.modeling import choose_device, load_base_model, load_tokenizer
from trainer_core.reporting import CheckpointInfo

HEAD_FILE = "reward_head.safetensors"
HEAD_MODULE = "reward_head"  # the head's name among the loop's trainable modules (resume checkpoints)


class ScalarHead(nn.Module):
    """hidden -> one score; small initial weights so the first scores are near 0 (as TRL's)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.score = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.score.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.score.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden.to(self.score.weight.dtype)).squeeze(-1)


def head_for(model: nn.Module) -> ScalarHead:
    """Returns a fresh scalar head sized for ``model``'s hidden states, on its device (float32)."""
    config = model.config
    device = next(model.parameters()).device
    return ScalarHead(config.hidden_size).to(device)


def _decoder(model: nn.Module) -> nn.Module:
    # The transformer body without the LM head: the vocabulary projection is never needed here.
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return base.get_decoder()


def sequence_scores(
    model: nn.Module, head: ScalarHead, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Returns [B] float32 scores: the head on each row's last real token (right or left padding)."""
    hidden = _decoder(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (attention_mask * positions).argmax(dim=1)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return head(hidden[rows, last]).float()


def export_reward_model(
    model: nn.Module, head: ScalarHead, tokenizer: PreTrainedTokenizerBase, out_dir: Path, *,
    base_model_dir: Path, stage_index: int, step: int, config: dict[str, Any],
) -> CheckpointInfo:
    """Returns the info of a ``reward_model`` checkpoint: the merged model and its scalar head."""
    head_weights = {key: v.detach().float().cpu().contiguous() for key, v in head.state_dict().items()}
    return export_merged(
        model, tokenizer, out_dir, base_model_dir=base_model_dir, stage_index=stage_index, step=step,
        config=config, kind="reward_model",
        extra_files={HEAD_FILE: lambda path: save_file(head_weights, path)},
    )


def head_from_checkpoint(folder: Path, model: nn.Module) -> ScalarHead:
    """Returns the scalar head stored in a resume checkpoint of a reward_model stage."""
    head = head_for(model)
    stored = torch.load(folder / "modules.pt", weights_only=True, map_location="cpu")
    head.load_state_dict(stored[HEAD_MODULE])
    return head


class RewardModelScorer:
    """Scores (completion, prompt record) pairs with a ``reward_model`` checkpoint folder."""

    def __init__(self, folder: Path, batch_size: int = 16, device: torch.device | None = None) -> None:
        self._device = device or choose_device("auto")
        dtype = torch.bfloat16 if self._device.type == "cuda" else torch.float32
        self._model = load_base_model(folder, dtype, self._device).eval()
        self._head = ScalarHead(self._model.config.hidden_size).to(self._device)
        self._head.load_state_dict(load_file(folder / HEAD_FILE))
        self._tokenizer = load_tokenizer(folder)
        self._batch_size = batch_size

    @torch.no_grad()
    def __call__(self, texts: Sequence[str], items: Sequence[Mapping[str, Any]]) -> list[float]:
        """Returns one score per completion, each rendered after its record's prompt as in training."""
        examples = [render_response(self._tokenizer, dict(item), text)
                    for text, item in zip(texts, items, strict=True)]
        scores: list[float] = []
        for start in range(0, len(examples), self._batch_size):
            batch = collate_padded(examples[start : start + self._batch_size], self._tokenizer.pad_token_id)
            scores += sequence_scores(
                self._model, self._head, batch["input_ids"].to(self._device),
                batch["attention_mask"].to(self._device),
            ).tolist()
        return scores


def load_reward_model_scorer(folder: Path, batch_size: int = 16) -> RewardModelScorer:
    """Returns the scorer of a ``reward_model`` checkpoint folder (on the GPU when there is one)."""
    if not (folder / HEAD_FILE).is_file():
        raise ValueError(f"{folder} is not a reward_model checkpoint: it has no {HEAD_FILE}")
    return RewardModelScorer(folder, batch_size)
