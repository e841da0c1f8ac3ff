"""GRPO stage: G sampled completions per prompt, group-normalised rewards, clipped ratio, k3 KL.

Each optimizer step draws ``batch_size / num_generations * gradient_accumulation`` prompts, samples
``num_generations`` completions for each with the current policy (seeded by (seed, stage, step)),
scores them with the stage's reward spec and takes one gradient step on them. With one update per
batch the "old" policy is the current one (ratio 1, REFERENCE "GRPO"), so the clip only matters
numerically; the KL term is against the frozen stage-start reference, skipped when beta = 0.

Prompts, sampling and scoring come from ``trainer_core.rollouts``, shared with the PPO stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from trainer_core.config import GRPOStage
from trainer_core.generation import Completions, completion_forward, seeded_generator
from trainer_core.losses.common import truncated_importance_weights
from trainer_core.losses.grpo import grpo_advantages, grpo_loss
from trainer_core.methods.base import LossOutput, MethodDefaults, StageContext, stage_steps
from trainer_core.rollouts import PromptRollouts


@dataclass
class GRPOBatch:
    """One micro-batch: whole groups of completions, their rewards, advantages and reference log-probs."""

    completions: Completions
    advantages: torch.Tensor
    ref_logps: torch.Tensor | None
    rewards: torch.Tensor
    engine_logps: torch.Tensor | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


class GRPOMethod(MethodDefaults):
    """The GRPO stage method (see the module docstring)."""

    def __init__(self, ctx: StageContext) -> None:
        stage = ctx.stage
        assert isinstance(stage, GRPOStage)
        self._ctx = ctx
        self._stage = stage
        self._groups_per_batch = stage.batch_size // stage.num_generations
        self.rollouts = PromptRollouts(ctx, stage, self._groups_per_batch * stage.gradient_accumulation)
        self.total_steps = stage_steps(stage, self.rollouts.schedule.steps_per_epoch())
        self._last_step = 0  # evaluation follows this step's update: the weights' version

    def setup(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
        self.rollouts.setup(model, tokenizer)

    def micro_batches(self, model: nn.Module, step: int) -> Sequence[GRPOBatch]:
        """Returns the step's micro-batches, sampled and scored with the current policy.

        Advantages are computed once over the whole step: "batch" scaling divides by the std of
        every reward of the step, whatever the accumulation (groups never straddle micro-batches,
        so "group" and "none" are the same either way).
        """
        stage, ctx = self._stage, self._ctx
        group = stage.num_generations
        self._last_step = step
        indices = self.rollouts.schedule.indices(step)
        generator = seeded_generator(ctx.seed, ctx.stage_index, step, device=ctx.device)
        per_batch = self._groups_per_batch
        rollouts = [
            self.rollouts.sample_step(model, indices[start : start + per_batch], group, generator, step - 1)
            for start in range(0, len(indices), per_batch)
        ]
        rewards = torch.cat([rollout.rewards for rollout in rollouts])
        advantages, adv_metrics = grpo_advantages(rewards, group, stage.advantage_scaling)
        step_metrics = {k: float(v) for k, v in adv_metrics.items()} | self.rollouts.observe(rewards, group)
        batches: list[GRPOBatch] = []
        for rollout, batch_advantages in zip(
            rollouts, advantages.split([len(r.rewards) for r in rollouts]), strict=True
        ):
            completions = rollout.completions
            ref_logps = None
            if stage.beta > 0:
                with ctx.reference.active(model) as reference:
                    ref_logps = completion_forward(
                        reference, completions.prompt_ids, completions.prompt_mask,
                        completions.completion_ids, completions.completion_mask, stage.temperature,
                    ).logps
            batches.append(GRPOBatch(
                completions, batch_advantages.to(ctx.device), ref_logps, rollout.rewards,
                self.rollouts.mismatch_logps(rollout), {**rollout.metrics, **step_metrics},
            ))
        return batches

    def loss(self, model: nn.Module, batch: GRPOBatch, step: int) -> LossOutput:
        """Returns the micro-batch's summed GRPO loss (units: sequences for "grpo", tokens for "dapo")."""
        stage = self._stage
        c = batch.completions
        forward = completion_forward(
            model, c.prompt_ids, c.prompt_mask, c.completion_ids, c.completion_mask, stage.temperature
        )
        dapo = stage.loss_aggregation == "dapo"
        is_weights, is_metrics = None, {}
        if batch.engine_logps is not None:
            is_weights, is_metrics = truncated_importance_weights(
                forward.logps.detach(), batch.engine_logps, c.completion_mask, stage.rollout.tis_cap
            )
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
            is_weights=is_weights,
        )
        sequences = c.completion_ids.shape[0]
        units = int(c.completion_mask.sum()) if dapo else sequences
        if not dapo:
            loss = loss * sequences  # per-sequence mean -> sum over sequences
        num_tokens = int(c.prompt_mask.sum() + c.completion_mask.sum())
        return LossOutput(loss, units, num_tokens, {**batch.metrics, **metrics, **is_metrics})

    def evaluate(self, model: nn.Module) -> dict[str, float] | None:
        return self.rollouts.evaluate(model, self._stage.batch_size, self._last_step)

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.rollouts.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollouts.schedule.load_state_dict(state.get("schedule", {}))


def build(ctx: StageContext) -> GRPOMethod:
    """Returns the GRPO method for a stage context."""
    return GRPOMethod(ctx)
