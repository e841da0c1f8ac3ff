"""The one training loop every stage method runs in.

A method (``trainer_core.methods.base.StageMethod``) supplies micro-batches and a summed loss per
micro-batch; this loop owns the rest: AdamW, gradient accumulation normalised by the step's loss
units, bf16 autocast on CUDA, clipping, warmup + cosine/linear/constant learning rate, periodic
evaluation, checkpoints with retention, exact resume and the cooperative stop check. Those cover
the policy's trainable weights and the method's extra ``trainable_modules`` (PPO's value head)
alike.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from trainer_core.checkpoint import (
    load_resume_checkpoint,
    prune_checkpoints,
    remove_incomplete,
    save_resume_checkpoint,
)
from trainer_core.config import StageBase
from trainer_core.distributed import SINGLE, Ranks, agree, full_tensor, reshard, sum_across
from trainer_core.methods.base import Filler, LossOutput, StageMethod, weighted_mean
from trainer_core.modeling import trainable_parameters
from trainer_core.reporting import Reporter, StopRequested, raise_if_stopping


@dataclass(frozen=True)
class CheckpointPolicy:
    """When to write resume checkpoints and how many to keep (the best by eval_loss is kept too)."""

    every_steps: int | None
    keep: int


@dataclass
class StageOutcome:
    """How a stage ended: 'finished' (all steps done) or 'stopped' (should_stop; checkpoint saved)."""

    status: Literal["finished", "stopped"]
    step: int
    final_metrics: dict[str, float] = field(default_factory=dict)


def learning_rate_at(step: int, stage: StageBase, total_steps: int) -> float:
    """Returns the learning rate for optimizer step ``step`` (1-based).

    Linear warmup over ``warmup_steps`` then cosine or linear decay towards 0 at the end of the
    stage. A pure function of the step: resume needs no scheduler state.
    """
    base = stage.learning_rate
    if step <= stage.warmup_steps:
        return base * step / stage.warmup_steps
    if stage.lr_scheduler == "constant":
        return base
    # Progress counts from the first post-warmup step, so that step has the full rate and the
    # last step a small positive one (a zero-rate step would be wasted compute).
    progress = (step - stage.warmup_steps - 1) / max(1, total_steps - stage.warmup_steps)
    if stage.lr_scheduler == "linear":
        return base * (1.0 - progress)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def _optimizer(params: dict[str, nn.Parameter], stage: StageBase, device: torch.device) -> torch.optim.AdamW:
    # Biases and norm weights (1-D) take no weight decay, as in nanoGPT / most LM recipes.
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": stage.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=stage.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                             foreach=device.type == "cuda")


def _autocast(device: torch.device) -> Any:
    # bf16 autocast only on CUDA: CPU bf16 is slow on most hosts and would break exact-resume tests.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@contextmanager
def _rng_preserved(device: torch.device) -> Iterator[None]:
    """Runs a block (evaluation) without moving the training RNG streams."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


def _to_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def _step_totals(
    outputs: list[LossOutput], ranks: Ranks, device: torch.device
) -> tuple[dict[str, float], int, int]:
    """Returns (method metrics, loss units, tokens) of a step over every rank's micro-batches.

    Metrics are averaged over micro-batches weighted by loss units; the loss is the summed loss over
    the step's units. One all-reduce carries every sum, so N ranks report what one process would.
    """
    means = weighted_mean((out.metrics, out.num_units) for out in outputs)
    keys = sorted(means)
    weight = float(sum(max(out.num_units, 0) for out in outputs))
    local = [sum(_to_float(out.loss.detach()) for out in outputs),
             float(sum(out.num_units for out in outputs)), float(sum(out.num_tokens for out in outputs)),
             weight, *(means[key] * weight for key in keys)]
    loss_sum, units, tokens, weight, *sums = sum_across(local, ranks, device)
    metrics = {key: value / (weight or 1.0) for key, value in zip(keys, sums, strict=True)}
    metrics["loss"] = loss_sum / max(units, 1)
    return metrics, round(units), round(tokens)


def _micro_batch_loss(
    method: StageMethod, model: nn.Module, batch: Any, step: int, device: torch.device
) -> LossOutput:
    """Returns one micro-batch's loss after its backward; a Filler's counts nothing (zero gradient)."""
    filler = isinstance(batch, Filler)
    with _autocast(device):
        out = method.loss(model, batch.batch if filler else batch, step)
    if filler:
        # The forward and backward still run: every rank must join FSDP's all-gathers and reductions.
        out = LossOutput(out.loss * 0.0, 0, 0, out.metrics)
    out.loss.backward()
    return out


def _clip(params: list[nn.Parameter], max_norm: float | None) -> float:
    """Returns the gradient norm over every rank's shards after clipping to ``max_norm``."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = full_tensor(torch.nn.utils.get_total_norm(grads)) if grads else torch.tensor(0.0)
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return _to_float(norm)


def _trained_parameters(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    """Returns the policy's trainable parameters and those of the method's extra modules, by name."""
    params = trainable_parameters(model)
    for name, module in modules.items():
        params |= {f"{name}.{key}": p for key, p in module.named_parameters() if p.requires_grad}
    return params


def _accumulate(model: nn.Module, method: StageMethod, step: int, device: torch.device,
                should_stop: Callable[[], bool] | None) -> list[LossOutput]:
    """Returns the losses of the step's micro-batches, gradients accumulated; ``should_stop`` is
    asked before each (up to 1,024 of them may make one step)."""
    batches = method.micro_batches(model, step)
    model.train()
    outputs: list[LossOutput] = []
    for batch in batches:
        raise_if_stopping(should_stop)
        outputs.append(_micro_batch_loss(method, model, batch, step, device))
    return outputs


def _evaluate(
    model: nn.Module, method: StageMethod, device: torch.device, ranks: Ranks
) -> dict[str, float] | None:
    model.eval()
    with _rng_preserved(device), torch.no_grad(), _autocast(device):
        metrics = method.evaluate(model)
    model.train()
    if ranks.distributed:
        reshard(model)
    return metrics


def train_stage(
    model: nn.Module,
    method: StageMethod,
    stage: StageBase,
    *,
    stage_index: int,
    stage_folder: Path,
    tokenizer: Any,
    checkpoints: CheckpointPolicy,
    reporter: Reporter,
    device: torch.device,
    manifest_config: dict[str, Any],
    resume_from: Path | None = None,
    ranks: Ranks = SINGLE,
) -> StageOutcome:
    """Returns how the stage ended after training ``model`` with ``method`` from step 0 or a checkpoint.

    With several ``ranks`` every rank calls this with its FSDP-sharded model and a method that gives
    it its share of each micro-batch; only rank 0's reporter records anything.
    """
    remove_incomplete(stage_folder)
    method.setup(model, tokenizer)
    if ranks.distributed:
        reshard(model)
    modules = method.trainable_modules()
    params = _trained_parameters(model, modules)
    optimizer = _optimizer(params, stage, device)
    total = method.total_steps
    start_step, last_eval = 0, {}
    if resume_from is not None:
        state = load_resume_checkpoint(resume_from, model=model, optimizer=optimizer, modules=modules,
                                       ranks=ranks)
        method.load_state_dict(state.method_state)
        start_step, last_eval = state.step, state.trainer_state.get("last_eval", {})

    def checkpoint(step: int, eval_metrics: dict[str, float]) -> None:
        info = save_resume_checkpoint(
            stage_folder, stage_index, step, total_steps=total, model=model, optimizer=optimizer,
            method_state=method.state_dict(), trainer_state={"last_eval": last_eval},
            config=manifest_config, metrics=eval_metrics, modules=modules, ranks=ranks,
        )
        if info is not None:  # rank 0
            reporter.on_checkpoint(info)
            for path in prune_checkpoints(stage_folder, checkpoints.keep):
                reporter.on_checkpoint_removed(path)

    train_metrics: dict[str, float] = {}
    # Inside a step only a single process may stop on its own; several ranks stop together at the
    # step's end, where they agree on it.
    inside_step_stop = None if ranks.distributed else reporter.should_stop
    for step in range(start_step + 1, total + 1):
        started = time.perf_counter()
        lr = learning_rate_at(step, stage, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        try:
            outputs = _accumulate(model, method, step, device, inside_step_stop)
        except StopRequested:
            # Stopped inside the step (a cancel, or a lease another attempt took): the half-made
            # step is dropped and the run resumes from its last complete checkpoint.
            optimizer.zero_grad(set_to_none=True)
            return StageOutcome("stopped", step - 1, train_metrics)
        metrics, units, tokens = _step_totals(outputs, ranks, device)
        # The micro-batch losses are sums, so dividing the accumulated gradient by the step's unit
        # count makes accumulation exactly one big batch, however the units fell across batches
        # and ranks (FSDP averages gradients over ranks, hence the world size).
        divisor = max(units, 1) / ranks.world_size
        for p in params.values():
            if p.grad is not None:
                p.grad.div_(divisor)
        grad_norm = _clip(list(params.values()), stage.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        train_metrics = {
            **metrics,
            "lr": lr,
            "grad_norm": grad_norm,
            "num_tokens": float(tokens),
            "tokens_per_second": tokens / elapsed if elapsed > 0 else 0.0,
            "step_time": elapsed,
        }
        reporter.on_metrics(stage_index, step, "train", train_metrics)

        eval_metrics: dict[str, float] = {}
        if step == total or (stage.eval_every_steps and step % stage.eval_every_steps == 0):
            with contextlib.suppress(StopRequested):  # the step is complete: skip the eval, save below
                eval_metrics = _evaluate(model, method, device, ranks) or {}
            if eval_metrics:
                last_eval = eval_metrics
                reporter.on_metrics(stage_index, step, "eval", eval_metrics)

        stop = agree(reporter.should_stop(), ranks, device)
        periodic = checkpoints.every_steps is not None and step % checkpoints.every_steps == 0
        # The last step always checkpoints: it is how a resumed pipeline knows the stage is done.
        if stop or periodic or step == total:
            checkpoint(step, eval_metrics)
        if stop:
            return StageOutcome("stopped", step, train_metrics)
    return StageOutcome("finished", total, {**train_metrics, **last_eval})
