"""SAD stage (Structured Agent Distillation, arXiv 2505.13820): span-weighted distillation on trajectories.

Trajectories become ids with reasoning/action/observation spans (``spans.py``). The student is
trained on reasoning and action tokens only, towards the teacher distribution from the stage's
``teacher`` source (dataset top-k, a local model, or SGLang; ``teachers.py``); tokens with no
teacher distribution (none stored, or ``divergence: ce``) get span-weighted cross-entropy on the
trajectory's own tokens. The two parts are averaged by their token counts.

Data order: the epoch stream SFT and DPO use, micro-batches of ``batch_size`` trajectories from a
permutation seeded by (seed, stage, epoch), or, with ``curriculum``, from the fixed simple-to-complex
order (fewer reasoning/action steps, then fewer tokens) in every epoch. A loss unit is one
trajectory: each micro-batch's loss is its batch mean times its size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer_core.config import SADStage
from trainer_core.curriculum import complexity_order
from trainer_core.data import IGNORE_INDEX
from trainer_core.errors import TrainingDataError
from trainer_core.losses.sad import sad_loss_from_hidden
from trainer_core.methods.base import (
    LossOutput,
    MethodDefaults,
    StageContext,
    epoch_stream,
    shuffled_chunks,
    weighted_mean,
)
from trainer_core.modeling import HeadInputs, head_inputs
from trainer_core.spans import ACTION, REASONING, TokenizedTrajectory, trajectory_token_spans
from trainer_core.teachers import LocalTeacher, SGLangTeacher, TeacherBatch, stored_teacher


@dataclass
class SADBatch:
    """A right-padded micro-batch; masks and labels are aligned to logits (position t scores token t+1)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    reasoning_mask: torch.Tensor
    action_mask: torch.Tensor
    teacher: TeacherBatch | None


def _steps(traj: TokenizedTrajectory) -> int:
    """Returns the number of reasoning/action spans (runs of one type) in a trajectory."""
    runs, previous = 0, None
    for kind in traj.span_type_ids:
        if kind in (REASONING, ACTION) and kind != previous:
            runs += 1
        previous = kind
    return runs


def _tokenize(
    ctx: StageContext, stage: SADStage, records: Sequence[dict[str, Any]]
) -> list[TokenizedTrajectory]:
    out = [
        trajectory_token_spans(ctx.tokenizer, record, stage.markers, stage.max_seq_len, stage.truncation)
        for record in records
    ]
    return [traj for traj in out if traj is not None]


def _teacher_source(ctx: StageContext, stage: SADStage) -> LocalTeacher | SGLangTeacher | None:
    """Returns the online teacher for ``model``/``sglang`` sources after checking its vocabulary."""
    spec = stage.teacher
    if spec.source == "dataset" or stage.divergence == "ce":
        return None
    teacher: LocalTeacher | SGLangTeacher
    if spec.source == "model":
        assert spec.model is not None
        model = ctx.resolve_model(spec.model) if ctx.resolve_model else Path(spec.model)
        teacher = LocalTeacher(model, spec.top_k, ctx.device)
    else:
        assert spec.url is not None
        teacher = SGLangTeacher(spec.url, spec.top_k)
    teacher.check_vocabulary(ctx.tokenizer)
    return teacher


class SADMethod(MethodDefaults):
    """The SAD stage method (see the module docstring)."""

    def __init__(self, ctx: StageContext) -> None:
        stage = ctx.stage
        assert isinstance(stage, SADStage)
        self._ctx = ctx
        self._stage = stage
        self._train = _tokenize(ctx, stage, ctx.train_records)
        if not self._train:
            raise TrainingDataError(
                "no trajectory has reasoning or action tokens within max_seq_len: check the span markers"
            )
        self._eval = _tokenize(ctx, stage, ctx.eval_records)
        self.stream, self.total_steps = epoch_stream(ctx, self._planner())
        self._teacher = _teacher_source(ctx, stage)

    def _planner(self) -> Callable[[np.random.Generator], list[list[int]]]:
        size = self._stage.batch_size
        if not self._stage.curriculum:
            return shuffled_chunks(len(self._train), size)
        order = complexity_order([_steps(t) for t in self._train], [len(t) for t in self._train])
        return lambda rng: [order[i:i + size] for i in range(0, len(order), size)]

    @torch.no_grad()
    def _batch(self, trajectories: Sequence[TokenizedTrajectory]) -> SADBatch:
        width = max(len(t) for t in trajectories)
        pad = self._ctx.tokenizer.pad_token_id
        ids = torch.full((len(trajectories), width), pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        types = torch.zeros_like(ids)
        for row, traj in enumerate(trajectories):
            ids[row, : len(traj)] = torch.tensor(traj.input_ids)
            attention[row, : len(traj)] = 1
            types[row, : len(traj)] = torch.tensor(traj.span_type_ids)
        # Span types describe target tokens; the logits at t predict token t+1, so shift left by one.
        target_types = torch.nn.functional.pad(types[:, 1:], (0, 1))
        targets = torch.where(attention.bool(), ids, IGNORE_INDEX)
        labels = torch.nn.functional.pad(targets[:, 1:], (0, 1), value=IGNORE_INDEX)
        if self._teacher is not None:
            teacher = self._teacher.distributions(ids, attention)
        elif self._stage.divergence != "ce":
            teacher = stored_teacher(trajectories, width, len(self._ctx.tokenizer))
        else:
            teacher = None
        device = self._ctx.device
        return SADBatch(
            ids.to(device), attention.to(device), labels.to(device),
            (target_types == REASONING).to(device), (target_types == ACTION).to(device),
            None if teacher is None else teacher.to(device),
        )

    def micro_batches(self, model: nn.Module, step: int) -> Sequence[SADBatch]:
        """Returns the step's micro-batches with their teacher distributions."""
        chunks = self.stream.micro_batches(step, self._stage.gradient_accumulation)
        return [self._batch([self._train[i] for i in indices]) for indices in chunks]

    def _loss(
        self, student: HeadInputs, batch: SADBatch, progress: float
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Returns the batch-mean SAD loss: divergence where a teacher exists, cross-entropy elsewhere."""
        stage = self._stage
        weights = {
            "reasoning_weight": stage.span_weights.reasoning, "action_weight": stage.span_weights.action,
            "reasoning_weight_end": stage.span_weights_end.reasoning if stage.span_weights_end else None,
            "action_weight_end": stage.span_weights_end.action if stage.span_weights_end else None,
            "progress": progress,
        }
        available = batch.teacher.available if batch.teacher else torch.zeros_like(batch.reasoning_mask)
        parts: list[tuple[int, torch.Tensor]] = []
        metrics: dict[str, Any] = {}
        distilled = (batch.reasoning_mask | batch.action_mask) & available
        if batch.teacher is not None and distilled.any():
            loss, metrics = sad_loss_from_hidden(
                student.hidden, student.head, student.vocab,
                batch.reasoning_mask & available, batch.action_mask & available,
                teacher=batch.teacher.teacher, divergence=stage.divergence, temperature=stage.temperature,
                jsd_beta=stage.jsd_beta, alpha=stage.alpha, tail_bucket=stage.tail_bucket,
                weighting=stage.weighting, **weights,
            )
            parts.append((int(distilled.sum()), loss))
        plain = (batch.reasoning_mask | batch.action_mask) & ~available
        if plain.any() or not parts:
            # Confidence weighting needs a teacher; its tokens fall back to plain span-type weights.
            weighting = "span_type" if stage.weighting == "confidence" else stage.weighting
            loss, ce_metrics = sad_loss_from_hidden(
                student.hidden, student.head, student.vocab,
                batch.reasoning_mask & ~available, batch.action_mask & ~available,
                labels=batch.labels, divergence="ce", weighting=weighting, **weights,
            )
            parts.append((int(plain.sum()), loss))
            metrics = {**{f"ce/{k}": v for k, v in ce_metrics.items()}, **metrics}
        total = sum(count for count, _ in parts)
        return sum(count * loss for count, loss in parts) / max(total, 1), metrics

    @staticmethod
    def _student(model: nn.Module, batch: SADBatch) -> HeadInputs:
        return head_inputs(model, {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})

    def loss(self, model: nn.Module, batch: SADBatch, step: int) -> LossOutput:
        """Returns the micro-batch's SAD loss summed over its trajectories (unit: one trajectory)."""
        loss, metrics = self._loss(self._student(model, batch), batch, step / self.total_steps)
        rows = batch.input_ids.shape[0]
        return LossOutput(loss * rows, rows, int(batch.attention_mask.sum()), metrics)

    def evaluate(self, model: nn.Module) -> dict[str, float] | None:
        """Returns ``eval_loss`` and the teacher KLs over the eval trajectories (None without any)."""
        if not self._eval:
            return None
        parts = []
        size = self._stage.batch_size
        for start in range(0, len(self._eval), size):
            batch = self._batch(self._eval[start : start + size])
            loss, metrics = self._loss(self._student(model, batch), batch, 1.0)
            parts.append(({"eval_loss": loss, **metrics}, batch.input_ids.shape[0]))
        return weighted_mean(parts)


def build(ctx: StageContext) -> SADMethod:
    """Returns the SAD method for a stage context (loads and checks the teacher first)."""
    return SADMethod(ctx)
