"""The interface between the training loop and a stage method (SFT, DPO, GRPO, PPO, SAD).

A method supplies batches and a loss step; `trainer_core.loop.train_stage` does everything else
(optimizer, accumulation, autocast, clipping, schedule, eval, checkpoints, resume, stop checks).
Methods never subclass the loop.

Each method module exposes ``build(ctx: StageContext) -> StageMethod`` and is registered by name in
``trainer_core.methods`` (imported lazily). ``MethodDefaults`` gives the optional hooks their
do-nothing forms; ``stage_steps`` is how every method counts its optimizer steps, and
``weighted_mean`` how every step and eval metric is averaged.

Extra trainable modules: a method may own modules besides the policy (PPO's value head), created
in ``setup`` and returned by ``trainable_modules``. The loop's optimizer, learning-rate schedule,
gradient normalisation and clipping cover their parameters like the policy's, and resume
checkpoints store their weights, so a method never steps an optimizer itself.

Step numbering: optimizer steps are numbered 1..``total_steps``. ``micro_batches(model, step)`` gives
the micro-batches of step ``step``; after that step the loop reports metrics and may checkpoint
under the same number.

Gradient accumulation contract: ``LossOutput.loss`` is a SUM over the micro-batch's normalisation
units (loss tokens for SFT, preference pairs for DPO, sequences or tokens for GRPO), and
``num_units`` says how many units it sums over. The loop back-propagates the sums of all
micro-batches of a step and divides the gradient by the step's total ``num_units``, so a step
with accumulation equals one big batch whatever the micro-batch sizes.

Resume contract: the loop restores weights, optimizer, scheduler and every RNG (python, numpy,
torch, cuda) at a step boundary, then calls ``setup`` and ``load_state_dict``. So a method must be
deterministic given (ctx.seed, ctx.stage_index, step) and the RNG state — e.g. derive the data
order of an epoch from a generator seeded by (seed, stage_index, epoch), never from an iterator
position — and keep anything else it accumulates (rollout buffers, curriculum level) in
``state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from trainer_core.errors import TrainingDataError

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from trainer_core.config import Adapter, Stage, StageBase
    from trainer_core.graders.scoring import GraderRuntime
    from trainer_core.model_folders import ModelFolders
    from trainer_core.modeling import ReferencePolicy

from trainer_core.distributed import SINGLE, Ranks

RECORD_FORMAT_KEY = "format"


@dataclass
class LossOutput:
    """What one micro-batch's loss step gives back to the loop.

    ``loss``: scalar tensor with grad, the SUM of per-unit losses over this micro-batch.
    ``num_units``: how many units ``loss`` sums over (the loop normalises by the step total).
    ``num_tokens``: real (non-padding) tokens that went through the model, for tokens_per_second.
    ``metrics``: per-micro-batch metrics (python floats or 0-dim tensors); the loop averages them
    over the step's micro-batches weighted by ``num_units``.
    """

    loss: torch.Tensor
    num_units: int
    num_tokens: int
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageContext:
    """Everything a method builder gets: the stage config, data, tokenizer, device, reference.

    ``train_records`` / ``eval_records``: normalised records (see ``trainer_core.data``) of the
    stage's weighted training mixture and held-out split (``eval_dataset`` or ``eval_fraction``);
    ``eval_records`` may be empty. Records are canonical dicts (``trainer_core.data.records``)
    tagged with their dataset format under ``RECORD_FORMAT_KEY`` (an SFT stage may mix "sft" and
    "trajectories" records, which a ``text`` field alone cannot tell apart).
    ``reference``: the frozen policy as it was when the stage began; loaded on first use.
    ``resolve_model``: turns a base model name or checkpoint id into its folders (SAD teachers).
    ``work_dir``: this stage's folder ``stage-{i}/``; a method may cache files under it.
    ``graders``: what RL rewards need from the host (sandbox, judge endpoint and keys, reward models).
    ``rollout_sglang_url``: the SGLang server RL stages may sample on (``rollout.engine: sglang``).
    ``ranks``: with several processes, each trains on its share of every micro-batch
    (``EpochStream.rank_micro_batches``).
    ``should_stop``: the reporter's stop flag, for work inside a step that can run long (sampling).
    """

    stage: Stage
    stage_index: int
    seed: int
    adapter: Adapter
    tokenizer: PreTrainedTokenizerBase
    train_records: Sequence[Any]
    eval_records: Sequence[Any]
    device: torch.device
    work_dir: Path
    reference: ReferencePolicy
    resolve_model: Callable[[str], ModelFolders | Path] | None = None
    graders: GraderRuntime | None = None
    rollout_sglang_url: str | None = None
    ranks: Ranks = SINGLE
    should_stop: Callable[[], bool] | None = None


class StageMethod(Protocol):
    """A training method as the loop sees it."""

    total_steps: int
    """Optimizer steps in this stage (known after ``build``; from epochs or max_steps)."""

    def setup(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
        """Runs once at stage start AND after a resume (e.g. cache reference log-probs)."""

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Returns modules besides the policy that train with it (after ``setup``); {} for most methods."""

    def micro_batches(self, model: nn.Module, step: int) -> Sequence[Any]:
        """Returns the micro-batches of optimizer step ``step`` (1-based), deterministic as above.

        Called with the model in whatever mode the previous call left it; rollout methods may
        generate here (switching to eval mode themselves). The loop sets train mode afterwards.
        """

    def loss(self, model: nn.Module, batch: Any, step: int) -> LossOutput:
        """Returns the summed loss of one micro-batch (called in train mode, under autocast)."""

    def evaluate(self, model: nn.Module) -> dict[str, float] | None:
        """Returns eval-split metrics (``eval_loss`` picks the best checkpoint) or None.

        Called in eval mode under ``torch.no_grad``; RNG states are restored afterwards, so
        evaluation never changes the training trajectory.
        """

    def state_dict(self) -> dict[str, Any]:
        """Returns method-owned state to checkpoint; {} when stateless.

        Plain containers of tensors, numbers and strings only: checkpoints are read back with
        ``torch.load(weights_only=True)``.
        """

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what ``state_dict`` returned (called after ``setup`` on resume)."""


class MethodDefaults:
    """The do-nothing forms of the optional ``StageMethod`` hooks, for methods to inherit.

    No setup, no extra trainable modules, no state of their own: the data order is a function of
    (seed, stage, step).
    """

    def setup(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
        """Nothing to prepare."""

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""


def stage_steps(stage: StageBase, steps_per_epoch: float, *, repeats: int = 1) -> int:
    """Returns the optimizer steps of a stage: ``max_steps``, else ``epochs`` passes over its data.

    ``steps_per_epoch``: optimizer steps one pass over the data takes (may be fractional, as with
    micro-batches not divisible by the accumulation). ``repeats``: optimizer steps per step's
    worth of data (PPO trains ``ppo_epochs`` steps on each rollout), so a stage ends on a whole
    rollout.
    """
    if stage.max_steps is not None:
        return stage.max_steps
    return max(1, math.ceil((stage.epochs or 1.0) * steps_per_epoch)) * repeats


def weighted_mean(parts: Iterable[tuple[Mapping[str, Any], float]]) -> dict[str, float]:
    """Returns each metric's mean over ``(metrics, weight)`` parts, weighted (e.g. by loss units or rows).

    Values may be python numbers or 0-dim tensors. A metric missing from some parts counts as 0
    there: the divisor is the total weight of all parts (negative weights count as 0).
    """
    sums: dict[str, float] = {}
    total = 0.0
    for metrics, weight in parts:
        weight = max(float(weight), 0.0)
        total += weight
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value) * weight
    return {key: value / (total or 1.0) for key, value in sums.items()}


@dataclass(frozen=True)
class Filler:
    """A micro-batch a rank runs only to take part in the collectives; the loop counts none of it.

    When a micro-batch holds fewer examples than there are ranks (an epoch's short last chunk), the
    ranks left without one run a copy of its first example with the loss multiplied by zero.
    """

    batch: Any


def rank_share(indices: list[int], ranks: Ranks) -> tuple[list[int], bool]:
    """Returns (this rank's examples of a micro-batch, whether they are a filler).

    Rank r takes examples r, r + N, ... so the global batch stays ``batch_size`` examples whatever
    the number of ranks N.
    """
    share = indices[ranks.rank::ranks.world_size]
    return (share, False) if share else (indices[:1], True)


class EpochStream:
    """Micro-batches (lists of example indices) of an endless run of epochs, for map-style data.

    ``plan_epoch(rng)`` returns one epoch's micro-batches, shuffled with ``rng``, which is seeded by
    (seed, stage_index, epoch): any step's batches follow from its number alone, so a resume needs
    no iterator position. Every epoch must have the same number of micro-batches.
    """

    def __init__(
        self, plan_epoch: Callable[[np.random.Generator], list[list[int]]], seed: int, stage_index: int
    ) -> None:
        self._plan, self._seed, self._stage_index = plan_epoch, seed, stage_index
        self._cached: tuple[int, list[list[int]]] = (0, self._epoch(0))
        self.per_epoch = len(self._cached[1])
        if self.per_epoch == 0:
            raise ValueError("an epoch must hold at least one micro-batch")

    def _epoch(self, epoch: int) -> list[list[int]]:
        return self._plan(np.random.default_rng([self._seed, self._stage_index, epoch]))

    def micro_batches(self, step: int, accumulation: int) -> list[list[int]]:
        """Returns the ``accumulation`` micro-batches of optimizer step ``step`` (1-based)."""
        out = []
        for position in range((step - 1) * accumulation, step * accumulation):
            epoch, offset = divmod(position, self.per_epoch)
            if self._cached[0] != epoch:
                self._cached = (epoch, self._epoch(epoch))
            out.append(self._cached[1][offset])
        return out

    def rank_micro_batches(
        self, step: int, accumulation: int, ranks: Ranks, build: Callable[[list[int]], Any]
    ) -> list[Any]:
        """Returns this rank's micro-batches of step ``step``, built from its share of each one."""
        batches = []
        for indices in self.micro_batches(step, accumulation):
            share, filler = rank_share(indices, ranks)
            batches.append(Filler(build(share)) if filler else build(share))
        return batches


def epoch_stream(
    ctx: StageContext, plan_epoch: Callable[[np.random.Generator], list[list[int]]]
) -> tuple[EpochStream, int]:
    """Returns the stage's epoch stream and its optimizer steps (``stage_steps`` over its micro-batches)."""
    stream = EpochStream(plan_epoch, ctx.seed, ctx.stage_index)
    return stream, stage_steps(ctx.stage, stream.per_epoch / ctx.stage.gradient_accumulation)


def check_not_all_dropped(ctx: StageContext, records: Sequence[Any], kept: Sequence[Any], what: str) -> None:
    """Raises TrainingDataError when truncation dropped every one of a stage's training ``records``."""
    if records and not kept:
        stage = ctx.stage
        raise TrainingDataError(
            f"stages[{ctx.stage_index}]: all {len(records)} {what} were dropped by truncation "
            f"(max_seq_len={stage.max_seq_len}, truncation={stage.truncation!r}); raise max_seq_len"
        )


def shuffled_chunks(count: int, size: int) -> Callable[[np.random.Generator], list[list[int]]]:
    """Returns an epoch planner: a random permutation of ``count`` examples cut into chunks of ``size``."""

    def plan(rng: np.random.Generator) -> list[list[int]]:
        order = rng.permutation(count).tolist()
        return [order[i:i + size] for i in range(0, count, size)]

    return plan
