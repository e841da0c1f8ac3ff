"""The prompt side of the RL stages (GRPO, PPO): rendered prompts, the per-step prompt schedule and
curriculum, sampling completions with the current policy, and scoring them with the stage's reward
spec. Both rollout methods build one ``PromptRollouts`` and differ only in what they train on the
scored completions. Scoring goes through ``trainer_core.graders`` (graders or Tuneyard reward specs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from trainer_core.config import GRPOStage, PPOStage
from trainer_core.curriculum import PromptSchedule
from trainer_core.data.render import render_prompt
from trainer_core.generation import Completions, eval_mode, seeded_generator, stop_token_ids
from trainer_core.graders.scoring import build_grader
from trainer_core.methods.base import RECORD_FORMAT_KEY, StageContext, weighted_mean
from trainer_core.modeling import disable_dropout
from trainer_core.rollout_engines import RolloutEngine, build_engine

RolloutStage = GRPOStage | PPOStage

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
    """Rendered prompts, which ones each step uses, sampling and scoring, for one RL stage.

    Prompts longer than ``max_seq_len - max_new_tokens`` keep their last tokens (whatever the
    stage's ``truncation``): the end of a rendered prompt is the generation prompt the completion
    continues.
    """

    def __init__(self, ctx: StageContext, stage: RolloutStage, prompts_per_step: int) -> None:
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
        self.engine: RolloutEngine = build_engine(
            stage.rollout, sglang_url=ctx.rollout_sglang_url, work_dir=ctx.work_dir,
            name_prefix=f"policy-{ctx.seed}-{ctx.stage_index}",
        )
        self._stop_ids: list[int] = []

    def setup(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
        """Reads the stop tokens of the policy being trained and turns its dropout off.

        Policy forwards in RL run without dropout (as TRL's): the log-probs a rollout is scored
        with (eval mode) and those of the loss (train mode) must come from the same function, or
        the ratio is not 1 before any update.
        """
        self._stop_ids = stop_token_ids(model, tokenizer)
        disable_dropout(model)

    def sample(
        self, model: nn.Module, prompts: Sequence[list[int]], items: Sequence[dict[str, Any]],
        repeats: int, generator: torch.Generator, version: int,
    ) -> Rollout:
        """Returns ``repeats`` scored completions per prompt, grouped consecutively.

        ``version`` numbers the policy weights (the optimizer step about to be taken): engines
        that hold their own copy (SGLang) reload when it changes.
        """
        stage = self._stage
        completions = self.engine.sample(
            model,
            [ids for ids in prompts for _ in range(repeats)],
            version=version,
            max_new_tokens=stage.max_new_tokens,
            eos_token_ids=self._stop_ids,
            pad_token_id=self._ctx.tokenizer.pad_token_id,
            generator=generator,
            temperature=stage.temperature,
            top_p=stage.top_p,
            should_stop=self._ctx.should_stop,
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
        self, model: nn.Module, indices: Sequence[int], repeats: int, generator: torch.Generator, step: int
    ) -> Rollout:
        """Returns the scored completions of training prompts ``indices`` sampled before step ``step``."""
        prompts = [self._train[i] for i in indices]
        return self.sample(model, prompts, [self._train_items[i] for i in indices], repeats, generator, step)

    def mismatch_logps(self, rollout: Rollout) -> torch.Tensor | None:
        """Returns the engine's token log-probs when the loss must correct for them, else None."""
        return rollout.completions.logps if self.engine.corrects_mismatch else None

    def evaluate(self, model: nn.Module, batch_size: int, version: int) -> dict[str, float] | None:
        """Returns ``reward`` and per-function means of one seeded sample per eval prompt, or None."""
        if not self._eval:
            return None
        ctx = self._ctx
        generator = seeded_generator(ctx.seed, ctx.stage_index, _EVAL_STREAM, device=ctx.device)
        items = [_grader_item(record) for record in ctx.eval_records]
        parts: list[tuple[dict[str, float], float]] = []
        with eval_mode(model), torch.no_grad():
            for start in range(0, len(self._eval), batch_size):
                part = slice(start, start + batch_size)
                rollout = self.sample(model, self._eval[part], items[part], 1, generator, version)
                reward = float(rollout.rewards.mean())
                parts.append(({"reward": reward, **rollout.metrics}, len(rollout.rewards)))
        return weighted_mean(parts)

    def observe(self, rewards: torch.Tensor, repeats: int) -> dict[str, float]:
        """Returns curriculum metrics after feeding it each prompt's mean reward (its success)."""
        return self.schedule.observe(rewards.view(-1, repeats).mean(dim=1).tolist())
