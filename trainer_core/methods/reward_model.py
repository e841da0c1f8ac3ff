"""Reward-model stage: a scalar head on the policy architecture, Bradley-Terry on preference pairs.

The model is the run's base model with its adapter (LoRA or full) plus ``ScalarHead`` on the last
real token's final hidden state (``trainer_core.reward_models``). The head is an extra trainable
module of the loop, so optimizer, schedule, clipping and resume cover it. A micro-batch is
``batch_size`` pairs; the loss unit is a pair. Metrics: ``loss``, ``accuracy`` (chosen scored
above rejected), ``margin`` (mean score difference); the same with ``eval_`` on the held-out pairs.
The stage exports a ``reward_model`` checkpoint (merged model + head).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from trainer_core.config import RewardModelStage
from trainer_core.losses.reward_model import bradley_terry_loss
from trainer_core.methods.base import (
    EpochStream,
    LossOutput,
    MethodDefaults,
    StageContext,
    shuffled_chunks,
    stage_steps,
    weighted_mean,
)
from trainer_core.methods.dpo import Pair, collate_pairs, render_pairs
from trainer_core.modeling import disable_dropout
from trainer_core.reward_models import HEAD_MODULE, ScalarHead, head_for, sequence_scores


class RewardModelMethod(MethodDefaults):
    """Bradley-Terry reward-model training (see the module docstring)."""

    def __init__(self, ctx: StageContext) -> None:
        stage = ctx.stage
        assert isinstance(stage, RewardModelStage)
        self._ctx, self._stage = ctx, stage
        self._train = render_pairs(ctx, ctx.train_records, "train")
        self._eval = render_pairs(ctx, ctx.eval_records, "eval")
        self._stream = EpochStream(shuffled_chunks(len(self._train), stage.batch_size), ctx.seed,
                                   ctx.stage_index)
        self.total_steps = stage_steps(stage, self._stream.per_epoch / stage.gradient_accumulation)
        self.head: ScalarHead | None = None

    def setup(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
        """Creates the head (seeded by the stage's RNG state; a resume then loads its weights)."""
        if self._stage.disable_dropout:
            disable_dropout(model)
        self.head = head_for(model)

    def trainable_modules(self) -> dict[str, nn.Module]:
        assert self.head is not None, "setup() creates the head"
        return {HEAD_MODULE: self.head}

    def micro_batches(self, model: nn.Module, step: int) -> list[list[Pair]]:
        chunks = self._stream.micro_batches(step, self._stage.gradient_accumulation)
        return [[self._train[i] for i in chunk] for chunk in chunks]

    def _scores(self, model: nn.Module, pairs: Sequence[Pair]) -> tuple[torch.Tensor, torch.Tensor, int]:
        assert self.head is not None, "setup() creates the head"
        inputs, _ = collate_pairs(pairs, self._ctx.tokenizer.pad_token_id, self._ctx.device)
        scores = sequence_scores(model, self.head, inputs["input_ids"], inputs["attention_mask"])
        n = len(pairs)
        return scores[:n], scores[n:], int(inputs["attention_mask"].sum())

    def loss(self, model: nn.Module, batch: list[Pair], step: int) -> LossOutput:
        """Returns the micro-batch's summed Bradley-Terry loss (unit: one pair)."""
        chosen, rejected, tokens = self._scores(model, batch)
        loss, metrics = bradley_terry_loss(chosen, rejected, reduction="sum")
        return LossOutput(loss, len(batch), tokens, metrics)

    def evaluate(self, model: nn.Module) -> dict[str, float] | None:
        if not self._eval:
            return None
        parts: list[tuple[dict[str, Any], float]] = []
        size = self._stage.batch_size
        for start in range(0, len(self._eval), size):
            pairs = self._eval[start : start + size]
            chosen, rejected, _ = self._scores(model, pairs)
            loss, metrics = bradley_terry_loss(chosen, rejected)
            parts.append(({"eval_loss": loss, **{f"eval_{k}": v for k, v in metrics.items()}}, len(pairs)))
        return weighted_mean(parts)


def build(ctx: StageContext) -> RewardModelMethod:
    """Returns the reward-model method for a stage context."""
    return RewardModelMethod(ctx)
