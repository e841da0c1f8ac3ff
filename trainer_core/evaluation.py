"""Evaluating one model on canonical records: likelihood metrics and scored generations.

Metrics and the record formats they apply to:
- ``loss`` / ``perplexity``: mean cross-entropy (nats per token) over trained tokens, the same tokens
  SFT trains on (assistant turns, completions), and its exponential. On preference records, over the
  chosen answers. Token-weighted over the whole set, so long answers weigh what they weigh in training.
- ``preference_accuracy``: the fraction of preference pairs whose chosen answer the model gives a
  higher summed log-probability than the rejected one (the reward ordering DPO optimises, with the
  model itself as its own measure: no reference is needed to compare two models).
- ``exact_match`` and any reward registered in ``trainer_core.rewards`` that needs no parameters:
  the model generates from each prompt and the completion is scored against the reference answer.
  Prompts records give prompt + ``answer``; sft records give everything before the last assistant
  turn (or ``prompt``) as the prompt and that turn (or ``completion``) as the answer.

Pure library: a model, a tokenizer and records in, numbers and samples out (no database, no I/O).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from trainer_core.config import SamplingParams
from trainer_core.data import IGNORE_INDEX
from trainer_core.data.render import RenderedExample, render_preference, render_prompt, render_sft
from trainer_core.decoding import decode
from trainer_core.eval_metrics import (
    EVAL_SAMPLING,
    LIKELIHOOD_METRICS,
    PREFERENCE_METRICS,
    REWARD_METRICS,
    check_metrics,
)
from trainer_core.generation import eval_mode
from trainer_core.losses.common import token_logps
from trainer_core.methods.base import weighted_mean
from trainer_core.rewards import get_reward


@dataclass
class EvalResult:
    """The metrics of one model on one record set, and the first generations for inspection."""

    metrics: dict[str, float]
    num_examples: int
    samples: list[dict[str, Any]] = field(default_factory=list)


def _batches(examples: list[RenderedExample], size: int) -> list[list[RenderedExample]]:
    return [examples[i : i + size] for i in range(0, len(examples), size)]


@torch.no_grad()
def _token_logps(
    model: nn.Module, batch: list[RenderedExample], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(logps, mask)`` [B, T-1]: log-prob of each next token and whether it is trained."""
    device = next(model.parameters()).device
    width = max(len(e) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention[row, :n] = 1
    logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits[:, :-1]
    return token_logps(logits, labels[:, 1:].to(device))


def _loss_metrics(
    model: nn.Module, examples: list[RenderedExample], pad_id: int, batch_size: int
) -> dict[str, float]:
    parts = []
    for batch in _batches(examples, batch_size):
        logps, mask = _token_logps(model, batch, pad_id)
        count = int(mask.sum())
        parts.append(({"loss": -float(logps.sum()) / max(count, 1)}, count))
    loss = weighted_mean(parts).get("loss", 0.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def _preference_accuracy(
    model: nn.Module, pairs: list[tuple[RenderedExample, RenderedExample]], pad_id: int, batch_size: int
) -> float:
    wins = 0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        logps, _ = _token_logps(model, [c for c, _ in chunk] + [r for _, r in chunk], pad_id)
        sums = logps.sum(dim=-1)
        wins += int((sums[: len(chunk)] > sums[len(chunk) :]).sum())
    return wins / max(len(pairs), 1)


def prompt_and_answer(record: dict[str, Any]) -> tuple[dict[str, Any], str | None] | None:
    """Returns (a prompts-style record to generate from, the reference answer), or None for a record
    that has no prompt to continue (an sft ``text`` record)."""
    if "answer" in record:  # a prompts record
        return {k: record[k] for k in ("prompt", "messages") if record.get(k) is not None}, record["answer"]
    if "completion" in record:
        return {"prompt": record["prompt"]}, record["completion"]
    messages = record.get("messages")
    if messages and messages[-1]["role"] == "assistant":
        return {"messages": messages[:-1]}, messages[-1]["content"]
    return None


def _prompt_text(record: dict[str, Any]) -> str | list[dict[str, str]]:
    return record["messages"] if record.get("messages") is not None else record["prompt"]


def _scored_generations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict[str, Any]],
    rewards: list[str],
    generation: SamplingParams,
    eos_token_ids: Sequence[int],
    num_samples: int,
    on_example: Callable[[], None],
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    parts: list[tuple[dict[str, float], float]] = []
    samples: list[dict[str, Any]] = []
    for index, record in enumerate(records):
        pair = prompt_and_answer(record)
        if pair is None:
            continue
        prompt, answer = pair
        out = decode(model, tokenizer, render_prompt(tokenizer, prompt), generation.for_sample(index),
                     eos_token_ids=eos_token_ids)
        scores = {name: float(get_reward(name)(out.text, answer)) for name in rewards}
        parts.append((scores, 1.0))
        if len(samples) < num_samples:
            samples.append(
                {"prompt": _prompt_text(prompt), "completion": out.text, "answer": answer, "scores": scores}
            )
        on_example()
    if not parts:
        raise ValueError("no record has a prompt to generate from (sft 'text' records have none)")
    return weighted_mean(parts), samples


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict[str, Any]],
    fmt: str,
    metrics: Sequence[str],
    *,
    generation: SamplingParams = EVAL_SAMPLING,
    eos_token_ids: Sequence[int] | None = None,
    max_seq_len: int = 2048,
    batch_size: int = 8,
    num_samples: int = 5,
    on_progress: Callable[[float], None] | None = None,
) -> EvalResult:
    """Returns ``metrics`` of ``model`` on canonical ``records`` of format ``fmt`` (module docstring).

    ``eos_token_ids`` end a generation (default: the tokenizer's eos). ``on_progress`` receives the
    fraction of the work done after each generated example and each likelihood pass.
    """
    check_metrics(metrics, fmt)
    if not records:
        raise ValueError("the dataset has no records to evaluate")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = list(eos_token_ids) if eos_token_ids is not None else [tokenizer.eos_token_id]
    rewards = [m for m in metrics if m in REWARD_METRICS]
    steps = (1 if set(metrics) & {*LIKELIHOOD_METRICS, *PREFERENCE_METRICS} else 0) + (
        len(records) if rewards else 0
    )
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(done / steps)

    values: dict[str, float] = {}
    samples: list[dict[str, Any]] = []
    with eval_mode(model):
        if fmt == "preference":
            pairs = [
                p for r in records if (p := render_preference(tokenizer, r, max_seq_len, "left")) is not None
            ]
            if set(metrics) & set(LIKELIHOOD_METRICS):
                values.update(_loss_metrics(model, [c for c, _ in pairs], pad_id, batch_size))
            if "preference_accuracy" in metrics:
                values["preference_accuracy"] = _preference_accuracy(
                    model, pairs, pad_id, max(1, batch_size // 2)
                )
            tick()
        elif set(metrics) & set(LIKELIHOOD_METRICS):
            examples = [
                e for r in records if (e := render_sft(tokenizer, r, max_seq_len, "left")) is not None
            ]
            values.update(_loss_metrics(model, examples, pad_id, batch_size))
            tick()
        if rewards:
            scores, samples = _scored_generations(
                model, tokenizer, records, rewards, generation, eos, num_samples, tick
            )
            values.update(scores)
    return EvalResult(metrics={m: values[m] for m in metrics}, num_examples=len(records), samples=samples)
