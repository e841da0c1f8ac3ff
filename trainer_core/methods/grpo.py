"""GRPO stage: G sampled completions per prompt, group-normalised rewards, clipped ratio, k3 KL.

Each optimizer step draws ``batch_size / num_generations * gradient_accumulation`` prompts, samples
``num_generations`` completions for each with the current policy (seeded by (seed, stage, step)),
scores them with the stage's reward spec and takes one gradient step on them. With one update per
batch the "old" policy is the current one (ratio 1, REFERENCE "GRPO"), so the clip only matters
numerically; the KL term is against the frozen stage-start reference, skipped when beta = 0.

``PromptRollouts`` (prompt rendering, the per-step prompt schedule and curriculum, sampling and
reward scoring) is shared with the PPO stage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from trainer_core.config import GRPOStage, PPOStage
from trainer_core.curriculum import PromptSchedule
from trainer_core.data.render import render_prompt
from trainer_core.generation import (
    Completions,
    completion_forward,
    eval_mode,
    sample_completions,
    seeded_generator,
    stop_token_ids,
)
from trainer_core.graders.scoring import build_grader
from trainer_core.losses.grpo import grpo_advantages, grpo_loss
from trainer_core.methods.base import RECORD_FORMAT_KEY, LossOutput, StageContext

# Key that separates the evaluation sampling stream from every training step's stream.
_EVAL_STREAM = 2**31


@dataclass(frozen=True)
class Rollout:
    """Completions for some prompts (each repeated ``repeats`` times, consecutively) and their rewards."""

    completions: Completions
    rewards: torch.Tensor
    metrics: dict[str, float]


def _grader_item(record: dict[str, Any]) -> dict[str, Any]:
    """Returns the prompt record as graders see it (``{{item.<field>}}``): without the format tag."""
    return {key: value for key, value in record.items() if key != RECORD_FORMAT_KEY}


class PromptRollouts:
    """The prompt side of an RL stage: rendered prompts, which ones each step uses, sampling, scoring.

    Prompts longer than ``max_seq_len - max_new_tokens`` keep their last tokens (whatever the
    stage's ``truncation``): the end of a rendered prompt is the generation prompt the completion
    continues.
    """

    def __init__(self, ctx: StageContext, stage: GRPOStage | PPOStage, prompts_per_step: int) -> None:
        budget = stage.max_seq_len - stage.max_new_tokens  # >= 1: the stage config checks it
        self._stage = stage
        self._ctx = ctx
        self._train = [render_prompt(ctx.tokenizer, record)[-budget:] for record in ctx.train_records]
        self._eval = [render_prompt(ctx.tokenizer, record)[-budget:] for record in ctx.eval_records]
        self._train_items = [_grader_item(record) for record in ctx.train_records]
        difficulties = [record.get("difficulty") or 0 for record in ctx.train_records]
        self.schedule = PromptSchedule(
            difficulties, prompts_per_step, ctx.seed, ctx.stage_index, stage.curriculum
        )
        self.scorer = build_grader(stage.reward, ctx.graders)
        self._stop_ids: list[int] = []

    def setup(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
        """Reads the stop tokens of the policy being trained."""
        self._stop_ids = stop_token_ids(model, tokenizer)

    def sample(
        self, model: nn.Module, prompts: Sequence[list[int]], items: Sequence[dict[str, Any]],
        repeats: int, generator: torch.Generator,
    ) -> Rollout:
        """Returns ``repeats`` scored completions per prompt, grouped consecutively."""
        stage = self._stage
        completions = sample_completions(
            model,
            [ids for ids in prompts for _ in range(repeats)],
            max_new_tokens=stage.max_new_tokens,
            eos_token_ids=self._stop_ids,
            pad_token_id=self._ctx.tokenizer.pad_token_id,
            generator=generator,
            temperature=stage.temperature,
            top_p=stage.top_p,
        )
        tokenizer = self._ctx.tokenizer
        texts = tokenizer.batch_decode(completions.completion_token_lists(), skip_special_tokens=True)
        scores = self.scorer(texts, [item for item in items for _ in range(repeats)])
        rewards = torch.tensor(scores.totals, dtype=torch.float32)
        metrics = scores.metrics()
        metrics["completions/mean_length"] = float(completions.lengths.float().mean())
        metrics["completions/clipped_ratio"] = float(completions.truncated.float().mean())
        return Rollout(completions, rewards, metrics)

    def sample_step(
        self, model: nn.Module, indices: Sequence[int], repeats: int, generator: torch.Generator
    ) -> Rollout:
        """Returns the scored completions of training prompts ``indices``."""
        prompts = [self._train[i] for i in indices]
        return self.sample(model, prompts, [self._train_items[i] for i in indices], repeats, generator)

    def evaluate(self, model: nn.Module, batch_size: int) -> dict[str, float] | None:
        """Returns ``reward`` and per-function means of one seeded sample per eval prompt, or None."""
        if not self._eval:
            return None
        ctx = self._ctx
        generator = seeded_generator(ctx.seed, ctx.stage_index, _EVAL_STREAM, device=ctx.device)
        items = [_grader_item(record) for record in self._ctx.eval_records]
        totals: list[torch.Tensor] = []
        sums: dict[str, float] = {}
        with eval_mode(model), torch.no_grad():
            for start in range(0, len(self._eval), batch_size):
                part = slice(start, start + batch_size)
                rollout = self.sample(model, self._eval[part], items[part], 1, generator)
                totals.append(rollout.rewards)
                for name, value in rollout.metrics.items():
                    sums[name] = sums.get(name, 0.0) + value * len(rollout.rewards)
        count = len(self._eval)
        return {"reward": float(torch.cat(totals).mean()), **{k: v / count for k, v in sums.items()}}

    def observe(self, rewards: torch.Tensor, repeats: int) -> dict[str, float]:
        """Returns curriculum metrics after feeding it each prompt's mean reward (its success)."""
        return self.schedule.observe(rewards.view(-1, repeats).mean(dim=1).tolist())


def stage_length(stage: GRPOStage | PPOStage, steps_per_epoch: int) -> int:
    """Returns the optimizer steps of a stage: ``max_steps``, else ``epochs`` passes over the prompts."""
    if stage.max_steps is not None:
        return stage.max_steps
    return max(1, math.ceil((stage.epochs or 1.0) * steps_per_epoch))


@dataclass
class GRPOBatch:
    """One micro-batch: whole groups of completions, their advantages and reference log-probs."""

    completions: Completions
    advantages: torch.Tensor
    ref_logps: torch.Tensor | None
    metrics: dict[str, Any] = field(default_factory=dict)


class GRPOMethod:
    """The GRPO stage method (see the module docstring)."""

    def __init__(self, ctx: StageContext) -> None:
        stage = ctx.stage
        assert isinstance(stage, GRPOStage)
        self._ctx = ctx
        self._stage = stage
        self._groups_per_batch = stage.batch_size // stage.num_generations
        self.rollouts = PromptRollouts(ctx, stage, self._groups_per_batch * stage.gradient_accumulation)
        self.total_steps = stage_length(stage, self.rollouts.schedule.steps_per_epoch())

    def setup(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
        self.rollouts.setup(model, tokenizer)

    def micro_batches(self, model: nn.Module, step: int) -> Sequence[GRPOBatch]:
        """Returns the step's micro-batches, sampled and scored with the current policy."""
        stage, ctx = self._stage, self._ctx
        group = stage.num_generations
        indices = self.rollouts.schedule.indices(step)
        generator = seeded_generator(ctx.seed, ctx.stage_index, step, device=ctx.device)
        batches: list[GRPOBatch] = []
        all_rewards: list[torch.Tensor] = []
        for start in range(0, len(indices), self._groups_per_batch):
            chunk = indices[start : start + self._groups_per_batch]
            rollout = self.rollouts.sample_step(model, chunk, group, generator)
            advantages, adv_metrics = grpo_advantages(rollout.rewards, group, stage.advantage_scaling)
            completions = rollout.completions
            ref_logps = None
            if stage.beta > 0:
                with ctx.reference.active(model) as reference:
                    ref_logps = completion_forward(
                        reference, completions.prompt_ids, completions.prompt_mask,
                        completions.completion_ids, completions.completion_mask, stage.temperature,
                    ).logps
            all_rewards.append(rollout.rewards)
            metrics = {**rollout.metrics, **{k: float(v) for k, v in adv_metrics.items()}}
            batches.append(GRPOBatch(completions, advantages.to(ctx.device), ref_logps, metrics))
        curriculum_metrics = self.rollouts.observe(torch.cat(all_rewards), group)
        for batch in batches:
            batch.metrics.update(curriculum_metrics)
        return batches

    def loss(self, model: nn.Module, batch: GRPOBatch, step: int) -> LossOutput:
        """Returns the micro-batch's summed GRPO loss (units: sequences for "grpo", tokens for "dapo")."""
        stage = self._stage
        c = batch.completions
        forward = completion_forward(
            model, c.prompt_ids, c.prompt_mask, c.completion_ids, c.completion_mask, stage.temperature
        )
        dapo = stage.loss_aggregation == "dapo"
        loss, metrics = grpo_loss(
            forward.logps,
            forward.logps.detach(),
            batch.ref_logps,
            batch.advantages,
            c.completion_mask,
            epsilon=stage.epsilon,
            epsilon_high=stage.epsilon_high,
            beta=stage.beta,
            aggregation=stage.loss_aggregation,
            # A token count of 1 turns "dapo" into a plain token sum; the loop divides by the
            # step's total completion tokens (the units reported below).
            num_tokens_in_batch=1 if dapo else None,
        )
        sequences = c.completion_ids.shape[0]
        units = int(c.completion_mask.sum()) if dapo else sequences
        if not dapo:
            loss = loss * sequences  # per-sequence mean -> sum over sequences
        num_tokens = int(c.prompt_mask.sum() + c.completion_mask.sum())
        return LossOutput(loss, units, num_tokens, {**batch.metrics, **metrics})

    def evaluate(self, model: nn.Module) -> dict[str, float] | None:
        return self.rollouts.evaluate(model, self._stage.batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.rollouts.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollouts.schedule.load_state_dict(state.get("schedule", {}))


def build(ctx: StageContext) -> GRPOMethod:
    """Returns the GRPO method for a stage context."""
    return GRPOMethod(ctx)
