"""SFT stage: next-token cross-entropy on assistant/completion tokens, packed or length-grouped.

Records may be "sft" (chat, prompt/completion, text) or "trajectories" (agent traces, trained on
their reasoning and action spans from ``trainer_core.spans``).

Packing (the default) concatenates the examples of a micro-batch into rows no longer than its
longest example (best-fit decreasing) with a block-diagonal causal mask, so no compute goes to
padding while the attention span stays that of one example (the dense L×L mask costs O(L²) per
row on sdpa, so packing short examples into one max_seq_len row would make attention the
bottleneck of a small model). Without packing, micro-batches are length-grouped and padded.
Either way the LM head runs only at trained positions, a chunk of positions at a time
(``trainer_core.losses.chunked``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from trainer_core.config import SFTStage, SpanMarkers
from trainer_core.data import IGNORE_INDEX
from trainer_core.data.packing import (
    collate_flat,
    collate_packed,
    collate_padded,
    length_grouped_batches,
    plan_packs,
)
from trainer_core.data.render import RenderedExample, render_sft
from trainer_core.losses.sft import sft_loss_from_hidden
from trainer_core.methods.base import (
    RECORD_FORMAT_KEY,
    Filler,
    LossOutput,
    MethodDefaults,
    StageContext,
    check_not_all_dropped,
    epoch_stream,
    shuffled_chunks,
    weighted_mean,
)
from trainer_core.modeling import (
    ATTENTION_IMPLEMENTATION,
    PackedAttention,
    document_mask,
    head_inputs,
    packed_attention,
    use_attention,
)
from trainer_core.spans import trajectory_token_spans

_MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
_MARKERS = SpanMarkers()


@dataclass
class TokenBatch:
    """Model inputs and shifted labels of one micro-batch, on the training device."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    num_tokens: int


def render_examples(
    ctx: StageContext, records: Sequence[dict[str, Any]], split: str
) -> list[RenderedExample]:
    """Returns the rendered examples of ``records`` that keep trained tokens after truncation."""
    stage: SFTStage = ctx.stage  # type: ignore[assignment]
    examples = []
    for record in records:
        if record.get(RECORD_FORMAT_KEY) == "trajectories":
            # Agent traces train on their reasoning and action spans; observations (tool output)
            # and other text are context only.
            traj = trajectory_token_spans(
                ctx.tokenizer, record, _MARKERS, stage.max_seq_len, stage.truncation
            )
            example = traj.as_sft_example() if traj is not None else None
        else:
            example = render_sft(ctx.tokenizer, record, stage.max_seq_len, stage.truncation)
        if example is not None:
            examples.append(example)
    if split == "train":
        check_not_all_dropped(ctx, records, examples, "training examples")
    return examples


class SFTMethod(MethodDefaults):
    """Supervised fine-tuning; a micro-batch is ``batch_size`` examples."""

    def __init__(self, ctx: StageContext) -> None:
        stage: SFTStage = ctx.stage  # type: ignore[assignment]
        self.ctx, self.stage = ctx, stage
        self.train = render_examples(ctx, ctx.train_records, "train")
        self.eval = render_examples(ctx, ctx.eval_records, "eval")
        # The 4D mask is added to the attention scores, so it must match their dtype (bf16 under
        # CUDA autocast).
        self.mask_dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
        self.attention: PackedAttention = packed_attention(ctx.device)
        self.stream, self.total_steps = epoch_stream(ctx, self._planner())

    def _planner(self) -> Callable[[np.random.Generator], list[list[int]]]:
        if self.stage.packing:
            return shuffled_chunks(len(self.train), self.stage.batch_size)
        lengths = [len(e) for e in self.train]
        return lambda rng: length_grouped_batches(lengths, self.stage.batch_size, int(rng.integers(2**62)))

    def setup(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
        """Picks the attention that separates packed sequences (a varlen kernel where there is one)."""
        if self.stage.packing and self.attention != "dense_mask":
            use_attention(model, ATTENTION_IMPLEMENTATION[self.attention])

    def _collate(self, examples: list[RenderedExample]) -> TokenBatch:
        pad_id = self.ctx.tokenizer.pad_token_id
        device = self.ctx.device
        if not self.stage.packing:
            batch = collate_padded(examples, pad_id)
        elif self.attention == "dense_mask":
            rows = plan_packs([len(e) for e in examples], max(len(e) for e in examples))
            packed = [[examples[i] for i in row] for row in rows]
            batch = collate_packed(packed, pad_id, dtype=self.mask_dtype)
        else:
            # Padding-free: the whole micro-batch in one row, O(T) attention memory.
            batch = collate_flat(examples, pad_id)
        inputs = {key: batch[key].to(device) for key in _MODEL_INPUTS if key in batch}
        if self.stage.packing and self.attention == "flex":
            inputs["attention_mask"] = document_mask(batch["seq_lengths"], device)
        return TokenBatch(inputs, batch["labels"].to(device), int(batch["num_tokens"]))

    def micro_batches(self, model: nn.Module, step: int) -> list[TokenBatch | Filler]:
        return self.stream.rank_micro_batches(step, self.stage.gradient_accumulation, self.ctx.ranks,
                                              lambda indices: self._collate([self.train[i] for i in indices]))

    def _summed_loss(self, model: nn.Module, batch: TokenBatch) -> tuple[torch.Tensor, dict[str, Any], int]:
        out = head_inputs(model, batch.inputs)
        loss, metrics = sft_loss_from_hidden(out.hidden, out.head, batch.labels, vocab=out.vocab,
                                             reduction="sum", head_weight=out.head_weight)
        return loss, metrics, int((batch.labels != IGNORE_INDEX).sum())

    def loss(self, model: nn.Module, batch: TokenBatch, step: int) -> LossOutput:
        loss, metrics, units = self._summed_loss(model, batch)
        accuracy = metrics["mean_token_accuracy"]
        return LossOutput(loss, units, batch.num_tokens, {"mean_token_accuracy": accuracy})

    def evaluate(self, model: nn.Module) -> dict[str, float] | None:
        if not self.eval:
            return None
        parts = []
        size = self.stage.batch_size
        for start in range(0, len(self.eval), size):
            loss, metrics, units = self._summed_loss(model, self._collate(self.eval[start:start + size]))
            per_token = {"eval_loss": loss / max(units, 1),
                         "eval_mean_token_accuracy": metrics["mean_token_accuracy"]}
            parts.append((per_token, units))
        result = weighted_mean(parts)
        result["perplexity"] = math.exp(min(result["eval_loss"], 50.0))
        return result


def build(ctx: StageContext) -> SFTMethod:
    """Returns the SFT method for a stage context."""
    return SFTMethod(ctx)
