"""DPO stage: preference pairs against the frozen stage-start policy, reference log-probs cached once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from trainer_core.config import DPOStage
from trainer_core.data import IGNORE_INDEX
from trainer_core.data.packing import collate_padded
from trainer_core.data.render import RenderedExample, render_preference
from trainer_core.losses.chunked import chunked_token_logps
from trainer_core.losses.dpo import dpo_loss
from trainer_core.methods.base import (
    Filler,
    LossOutput,
    MethodDefaults,
    StageContext,
    check_not_all_dropped,
    epoch_stream,
    shuffled_chunks,
    weighted_mean,
)
from trainer_core.modeling import disable_dropout, head_inputs

# Pairs per reference forward in setup: bounded memory, independent of the training batch size.
_REFERENCE_CHUNK = 16


Pair = tuple[RenderedExample, RenderedExample]


@dataclass
class PairBatch:
    """Chosen rows then rejected rows of one micro-batch, with their cached reference log-probs."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor


def render_pairs(ctx: StageContext, records: Sequence[dict[str, Any]], split: str) -> list[Pair]:
    """Returns the rendered (chosen, rejected) pairs of ``records``, skipping those truncation drops."""
    stage = ctx.stage
    pairs = [render_preference(ctx.tokenizer, r, stage.max_seq_len, stage.truncation) for r in records]
    kept = [p for p in pairs if p is not None]
    if split == "train":
        check_not_all_dropped(ctx, records, kept, "preference pairs")
    return kept


def collate_pairs(
    pairs: Sequence[Pair], pad_token_id: int, device: torch.device
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Returns (model inputs, labels) of the pairs' chosen rows, then their rejected rows.

    Chosen and rejected go through one forward (concatenated) so both see the same weights, and
    the batch is twice as wide instead of two passes.
    """
    examples = [p[0] for p in pairs] + [p[1] for p in pairs]
    batch = collate_padded(examples, pad_token_id)
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids")}
    return {k: v.to(device) for k, v in inputs.items()}, batch["labels"].to(device)


def sequence_logps(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Returns [B] summed completion-token log-probs of each row.

    The LM head runs on completion tokens only, a chunk of positions at a time.
    """
    out = head_inputs(model, inputs)
    keep = labels != IGNORE_INDEX
    picked, _ = chunked_token_logps(out.hidden[keep], out.head, labels[keep], out.vocab)
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(keep)[keep]
    return torch.zeros(labels.shape[0], device=picked.device, dtype=picked.dtype).index_add(0, rows, picked)


class DPOMethod(MethodDefaults):
    """Sigmoid / IPO / cDPO preference optimisation; a micro-batch is ``batch_size`` pairs."""

    def __init__(self, ctx: StageContext) -> None:
        stage: DPOStage = ctx.stage  # type: ignore[assignment]
        self.ctx, self.stage = ctx, stage
        self.train_pairs = render_pairs(ctx, ctx.train_records, "train")
        self.eval_pairs = render_pairs(ctx, ctx.eval_records, "eval")
        plan = shuffled_chunks(len(self.train_pairs), stage.batch_size)
        self.stream, self.total_steps = epoch_stream(ctx, plan)
        self._ref: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _collate(self, pairs: Sequence[Pair]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return collate_pairs(pairs, self.ctx.tokenizer.pad_token_id, self.ctx.device)

    def _reference_logps(self, model: nn.Module, pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
        chosen, rejected = [], []
        with self.ctx.reference.active(model) as reference:
            for start in range(0, len(pairs), _REFERENCE_CHUNK):
                chunk = pairs[start:start + _REFERENCE_CHUNK]
                inputs, labels = self._collate(chunk)
                logps = sequence_logps(reference, inputs, labels)
                chosen.append(logps[: len(chunk)])
                rejected.append(logps[len(chunk):])
        if not pairs:
            return torch.zeros(0), torch.zeros(0)
        return torch.cat(chosen), torch.cat(rejected)

    def setup(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
        if self.stage.disable_dropout:
            # The reference runs without dropout; a policy with it would not match the reference
            # even before its first update (step-1 margins != 0).
            disable_dropout(model)
        # The reference never changes during the stage, so its log-probs are computed once. On
        # resume the same stage-start weights give the same numbers.
        self._ref = {"train": self._reference_logps(model, self.train_pairs),
                     "eval": self._reference_logps(model, self.eval_pairs)}

    def _batch(self, split: str, indices: Sequence[int]) -> PairBatch:
        pairs = self.train_pairs if split == "train" else self.eval_pairs
        inputs, labels = self._collate([pairs[i] for i in indices])
        ref_chosen, ref_rejected = self._ref[split]
        index = torch.tensor(list(indices))
        return PairBatch(inputs, labels, ref_chosen[index], ref_rejected[index])

    def micro_batches(self, model: nn.Module, step: int) -> list[PairBatch | Filler]:
        return self.stream.rank_micro_batches(step, self.stage.gradient_accumulation, self.ctx.ranks,
                                              lambda indices: self._batch("train", indices))

    def _loss(self, model: nn.Module, batch: PairBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        logps = sequence_logps(model, batch.inputs, batch.labels)
        n = batch.ref_chosen.shape[0]
        ref_chosen, ref_rejected = batch.ref_chosen.to(logps.device), batch.ref_rejected.to(logps.device)
        if self.stage.loss_type == "ipo":
            # IPO's target margin 1/(2 beta) is on log-probs averaged over completion tokens (the
            # IPO paper, TRL); sums would make it depend on completion length.
            counts = (batch.labels != IGNORE_INDEX).sum(dim=1).clamp(min=1).to(logps.device)
            logps = logps / counts
            ref_chosen, ref_rejected = ref_chosen / counts[:n], ref_rejected / counts[n:]
        return dpo_loss(
            logps[:n], logps[n:], ref_chosen, ref_rejected,
            beta=self.stage.beta, loss_type=self.stage.loss_type,
            label_smoothing=self.stage.label_smoothing, reduction="sum",
        )

    def loss(self, model: nn.Module, batch: PairBatch, step: int) -> LossOutput:
        loss, metrics = self._loss(model, batch)
        tokens = int(batch.inputs["attention_mask"].sum())
        return LossOutput(loss, batch.ref_chosen.shape[0], tokens, metrics)

    def evaluate(self, model: nn.Module) -> dict[str, float] | None:
        if not self.eval_pairs:
            return None
        size = self.stage.batch_size
        parts = []
        for start in range(0, len(self.eval_pairs), size):
            indices = range(start, min(start + size, len(self.eval_pairs)))
            loss, metrics = self._loss(model, self._batch("eval", indices))
            per_pair = {"eval_loss": loss / len(indices), **{f"eval_{k}": v for k, v in metrics.items()}}
            parts.append((per_pair, len(indices)))
        return weighted_mean(parts)


def build(ctx: StageContext) -> DPOMethod:
    """Returns the DPO method for a stage context."""
    return DPOMethod(ctx)
