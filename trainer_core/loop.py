"""The one training loop every stage method runs in.

A method (``trainer_core.methods.base.StageMethod``) supplies micro-batches and a summed loss per
micro-batch; this loop owns the rest: AdamW, gradient accumulation normalised by the step's loss
units, bf16 autocast on CUDA, clipping, warmup + cosine/linear/constant learning rate, periodic
evaluation, checkpoints with retention, exact resume and the cooperative stop check. Those cover
the policy's trainable weights and the method's extra ``trainable_modules`` (PPO's value head)
alike.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
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
from trainer_core.methods.base import LossOutput, StageMethod, weighted_mean
from trainer_core.modeling import trainable_parameters
from trainer_core.reporting import Reporter


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


def _step_metrics(outputs: list[LossOutput], units: int) -> dict[str, float]:
    """Returns the method metrics of a step, averaged over micro-batches weighted by loss units."""
    metrics = weighted_mean((out.metrics, out.num_units) for out in outputs)
    metrics["loss"] = sum(_to_float(out.loss.detach()) for out in outputs) / max(units, 1)
    return metrics


def _trained_parameters(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    """Returns the policy's trainable parameters and those of the method's extra modules, by name."""
    params = trainable_parameters(model)
    for name, module in modules.items():
        params |= {f"{name}.{key}": p for key, p in module.named_parameters() if p.requires_grad}
    return params


def _evaluate(model: nn.Module, method: StageMethod, device: torch.device) -> dict[str, float] | None:
    model.eval()
    with _rng_preserved(device), torch.no_grad(), _autocast(device):
        metrics = method.evaluate(model)
    model.train()
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
) -> StageOutcome:
    """Returns how the stage ended after training ``model`` with ``method`` from step 0 or a checkpoint."""
    remove_incomplete(stage_folder)
    method.setup(model, tokenizer)
    modules = method.trainable_modules()
    params = _trained_parameters(model, modules)
    optimizer = _optimizer(params, stage, device)
    total = method.total_steps
    start_step, last_eval = 0, {}
    if resume_from is not None:
        state = load_resume_checkpoint(resume_from, model=model, optimizer=optimizer, modules=modules)
        method.load_state_dict(state.method_state)
        start_step, last_eval = state.step, state.trainer_state.get("last_eval", {})

    def checkpoint(step: int, eval_metrics: dict[str, float]) -> None:
        info = save_resume_checkpoint(
            stage_folder, stage_index, step, total_steps=total, model=model, optimizer=optimizer,
            method_state=method.state_dict(), trainer_state={"last_eval": last_eval},
            config=manifest_config, metrics=eval_metrics, modules=modules,
        )
        reporter.on_checkpoint(info)
        for path in prune_checkpoints(stage_folder, checkpoints.keep):
            reporter.on_checkpoint_removed(path)

    train_metrics: dict[str, float] = {}
    for step in range(start_step + 1, total + 1):
        started = time.perf_counter()
        lr = learning_rate_at(step, stage, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = method.micro_batches(model, step)
        model.train()
        outputs: list[LossOutput] = []
        for batch in batches:
            with _autocast(device):
                out = method.loss(model, batch, step)
            out.loss.backward()
            outputs.append(out)
        units = sum(out.num_units for out in outputs)
        # The micro-batch losses are sums, so dividing the accumulated gradient by the step's unit
        # count makes accumulation exactly one big batch, however the units fell across batches.
        for p in params.values():
            if p.grad is not None:
                p.grad.div_(max(units, 1))
        max_norm = stage.max_grad_norm if stage.max_grad_norm is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens = sum(out.num_tokens for out in outputs)
        elapsed = time.perf_counter() - started
        train_metrics = {
            **_step_metrics(outputs, units),
            "lr": lr,
            "grad_norm": _to_float(grad_norm),
            "num_tokens": float(tokens),
            "tokens_per_second": tokens / elapsed if elapsed > 0 else 0.0,
            "step_time": elapsed,
        }
        reporter.on_metrics(stage_index, step, "train", train_metrics)

        eval_metrics: dict[str, float] = {}
        if step == total or (stage.eval_every_steps and step % stage.eval_every_steps == 0):
            eval_metrics = _evaluate(model, method, device) or {}
            if eval_metrics:
                last_eval = eval_metrics
                reporter.on_metrics(stage_index, step, "eval", eval_metrics)

        stop = reporter.should_stop()
        periodic = checkpoints.every_steps is not None and step % checkpoints.every_steps == 0
        # The last step always checkpoints: it is how a resumed pipeline knows the stage is done.
        if stop or periodic or step == total:
            checkpoint(step, eval_metrics)
        if stop:
            return StageOutcome("stopped", step, train_metrics)
    return StageOutcome("finished", total, {**train_metrics, **last_eval})
