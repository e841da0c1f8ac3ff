"""PPO stage: rollouts scored by the reward spec, KL-shaped token rewards, GAE, several epochs per rollout.

Step layout: a rollout of ``batch_size * gradient_accumulation`` prompts (one completion each)
serves ``ppo_epochs`` consecutive optimizer steps; each of those steps is one epoch over the whole
rollout, in ``gradient_accumulation`` micro-batches of ``batch_size`` shuffled by (seed, stage,
step). At a rollout's first step the method samples, runs the policy (old log-probs, values) and
the frozen reference, and computes rewards, GAE advantages/returns and whitening once
(REFERENCE "PPO"). The rollout buffer is part of ``state_dict``, so a resume in the middle of a
rollout's epochs continues on exactly the same data.

Value head: a linear layer on the policy's last hidden state, declared to the loop as an extra
trainable module, so the loop's optimizer, learning-rate schedule, gradient normalisation (by the
step's tokens) and clipping train it together with the policy, and resume checkpoints hold it.
It reads the hidden state detached: a critic on the policy's features that does not reshape
them, as with a separate value model, so the value loss's gradient reaches the head only and the
policy's only the clipped policy-gradient term.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from trainer_core.config import PPOStage
from trainer_core.generation import (
    Completions,
    completion_forward,
    concat_completions,
    eval_mode,
    seeded_generator,
)
from trainer_core.losses.common import masked_mean, truncated_importance_weights
from trainer_core.losses.ppo import gae, ppo_loss, ppo_per_token_rewards, whiten
from trainer_core.methods.base import LossOutput, MethodDefaults, StageContext, stage_steps, weighted_mean
from trainer_core.rollouts import PromptRollouts

_COMPLETION_FIELDS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
# Key separating the minibatch shuffles from the sampling streams of the same step.
_SHUFFLE_STREAM = 1


class PPOMethod(MethodDefaults):
    """The PPO stage method (see the module docstring)."""

    def __init__(self, ctx: StageContext) -> None:
        stage = ctx.stage
        assert isinstance(stage, PPOStage)
        self._ctx = ctx
        self._stage = stage
        self.rollouts = PromptRollouts(ctx, stage, stage.batch_size * stage.gradient_accumulation)
        # Each rollout (one step's worth of prompts) trains ppo_epochs optimizer steps.
        self.total_steps = stage_steps(
            stage, self.rollouts.schedule.steps_per_epoch(), repeats=stage.ppo_epochs
        )
        self.value_head: nn.Linear | None = None
        self._last_step = 0  # evaluation follows this step's update: the weights' version
        self._buffer: dict[str, Any] = {}

    def setup(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
        """Reads stop tokens and creates the value head (zero-initialised: V = 0 until it learns)."""
        self.rollouts.setup(model, tokenizer)
        head = nn.Linear(model.config.hidden_size, 1).to(self._ctx.device)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        self.value_head = head

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Returns the value head, trained by the loop alongside the policy."""
        assert self.value_head is not None, "setup() creates the value head"
        return {"value_head": self.value_head}

    def _values(self, hidden: torch.Tensor) -> torch.Tensor:
        assert self.value_head is not None, "setup() creates the value head"
        return self.value_head(hidden.detach().float()).squeeze(-1)

    @torch.no_grad()
    def _collect(self, model: nn.Module, rollout: int) -> None:
        """Fills the buffer with rollout ``rollout`` (0-based): samples, old log-probs, values, GAE."""
        stage, ctx = self._stage, self._ctx
        indices = self.rollouts.schedule.indices(rollout + 1)
        generator = seeded_generator(ctx.seed, ctx.stage_index, rollout + 1, device=ctx.device)
        parts: list[Completions] = []
        scores: list[torch.Tensor] = []
        sampled_metrics: list[tuple[dict[str, float], float]] = []
        for start in range(0, len(indices), stage.batch_size):
            chunk = indices[start : start + stage.batch_size]
            # The rollout's first step is rollout * ppo_epochs + 1: its weights have that many updates.
            sampled = self.rollouts.sample_step(model, chunk, 1, generator, rollout * stage.ppo_epochs)
            parts.append(sampled.completions)
            scores.append(sampled.rewards)
            sampled_metrics.append((sampled.metrics, len(sampled.rewards)))
        batch = concat_completions(parts, ctx.tokenizer.pad_token_id)
        score = torch.cat(scores).to(ctx.device)
        tensors = [getattr(batch, name) for name in _COMPLETION_FIELDS]
        with eval_mode(model):
            policy = completion_forward(model, *tensors, stage.temperature, with_hidden=True)
            assert policy.hidden is not None
            values = self._values(policy.hidden)
            with ctx.reference.active(model) as reference:
                ref_logps = completion_forward(reference, *tensors, stage.temperature).logps
        mask = batch.completion_mask
        rewards, reward_metrics = ppo_per_token_rewards(policy.logps, ref_logps, score, mask, stage.kl_coef)
        advantages, returns = gae(rewards, values, mask, stage.gamma, stage.lam)
        # A rollout of a single completion token has no variance to whiten by (batch_size 1,
        # max_new_tokens 1, or one completion that stopped at once): its advantage stays as GAE gave it.
        if stage.whiten_advantages and int(mask.sum()) >= 2:
            advantages = whiten(advantages, mask)
        metrics = weighted_mean(sampled_metrics)
        metrics |= {name: float(value) for name, value in reward_metrics.items()}
        metrics |= self.rollouts.observe(score.cpu(), 1)
        self._buffer = {
            "rollout": rollout,
            **{name: tensor for name, tensor in zip(_COMPLETION_FIELDS, tensors, strict=True)},
            "old_logps": policy.logps,
            # The engine's own log-probs when they may differ from the policy's (truncated IS).
            "engine_logps": batch.logps if self.rollouts.engine.corrects_mismatch else None,
            "old_values": values,
            "advantages": advantages,
            "returns": returns,
            "metrics": metrics,
        }

    def micro_batches(self, model: nn.Module, step: int) -> Sequence[torch.Tensor]:
        """Returns the step's micro-batches as row indices into the rollout buffer (sampled if new)."""
        stage, ctx = self._stage, self._ctx
        rollout = (step - 1) // stage.ppo_epochs
        self._last_step = step
        if self._buffer.get("rollout") != rollout:
            self._collect(model, rollout)
        rows = self._buffer["old_logps"].shape[0]
        shuffle = seeded_generator(ctx.seed, ctx.stage_index, step, _SHUFFLE_STREAM)
        order = torch.randperm(rows, generator=shuffle)
        return list(order.split(stage.batch_size))

    def loss(self, model: nn.Module, batch: torch.Tensor, step: int) -> LossOutput:
        """Returns the micro-batch's token-summed PPO loss, policy plus value term (unit: one token)."""
        stage, buf = self._stage, self._buffer
        rows = batch.to(self._ctx.device)
        prompt_ids, prompt_mask, completion_ids, mask = (buf[name][rows] for name in _COMPLETION_FIELDS)
        forward = completion_forward(
            model, prompt_ids, prompt_mask, completion_ids, mask, stage.temperature, with_hidden=True,
            with_entropy=True,
        )
        assert forward.hidden is not None
        is_weights, is_metrics = None, {}
        if buf.get("engine_logps") is not None:
            is_weights, is_metrics = truncated_importance_weights(
                buf["old_logps"][rows], buf["engine_logps"][rows], mask, stage.rollout.tis_cap
            )
        loss, metrics = ppo_loss(
            forward.logps, buf["old_logps"][rows], self._values(forward.hidden), buf["old_values"][rows],
            buf["advantages"][rows], buf["returns"][rows], mask,
            cliprange=stage.cliprange, cliprange_value=stage.cliprange_value, vf_coef=stage.vf_coef,
            is_weights=is_weights,
        )
        metrics |= is_metrics
        assert forward.entropy is not None
        metrics["policy/entropy"] = masked_mean(forward.entropy, mask)
        tokens = int(mask.sum())
        num_tokens = int(prompt_mask.sum()) + tokens
        # One step is one epoch over the whole buffer, so the loop's divisor (the step's units) is
        # all the rollout's completion tokens, for the policy and the value head alike.
        return LossOutput(loss * tokens, tokens, num_tokens, {**buf["metrics"], **metrics})

    def evaluate(self, model: nn.Module) -> dict[str, float] | None:
        return self.rollouts.evaluate(model, self._stage.batch_size, self._last_step)

    def state_dict(self) -> dict[str, Any]:
        """Returns the curriculum and the current rollout buffer (the loop stores the value head)."""
        return {"schedule": self.rollouts.schedule.state_dict(), "buffer": self._buffer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollouts.schedule.load_state_dict(state["schedule"])
        self._buffer = dict(state["buffer"])


def build(ctx: StageContext) -> PPOMethod:
    """Returns the PPO method for a stage context."""
    return PPOMethod(ctx)
