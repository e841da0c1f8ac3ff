"""Builders shared by the trainer_core tests: small JSONL datasets of every format and run specs.

Imported as ``tests.unit.trainer_core.factories`` (``tests`` is a package; its sub-folders are
namespace packages), so no test module imports another.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from trainer_core.config import LoraAdapter, RunSpec
from trainer_core.loop import CheckpointPolicy, train_stage
from trainer_core.methods import build_method
from trainer_core.methods.base import StageContext
from trainer_core.modeling import ReferencePolicy, load_policy, load_tokenizer, save_policy_weights

# A test choice, not the product default ("all-linear"): a random tiny model's RMS-normed features
# barely move its logits unless lm_head carries a LoRA too.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]

# The rollout methods' toy task, one a random tiny model can learn in a few steps: answer with a
# token that starts with a vowel (about 14% of the tiny vocabulary does, so the first groups already
# have reward variance; exact_match would start near 1/512 and give no signal).
VOWEL_FIRST_REWARD = {"type": "regex", "pattern": "^[aeiou]"}
VOWEL_PROMPTS = [{"prompt": f"Say a word that starts with a vowel ({i}):", "answer": None} for i in range(8)]
ROLLOUT_TARGETS = ["q_proj", "v_proj", "up_proj", "lm_head"]

DATASET_FORMATS = {
    "ds_sft": "sft", "ds_pref": "preference", "ds_prompts": "prompts", "ds_traj": "trajectories",
}


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Returns ``path`` after writing ``rows`` to it, one JSON object per line."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sft_rows(count: int = 24) -> list[dict[str, Any]]:
    """Returns chat SFT records whose answers follow a learnable pattern (odd → red, even → blue)."""
    return [{"messages": [{"role": "user", "content": f"Name colour {i}."},
                          {"role": "assistant", "content": f"Colour {i} is {'red' if i % 2 else 'blue'}."}]}
            for i in range(count)]


def preference_rows(count: int = 16) -> list[dict[str, Any]]:
    """Returns preference records that always prefer the same polite shape of answer."""
    return [{"prompt": f"Question {i}: is {i} a number?", "chosen": f" Yes, {i} is a number.",
             "rejected": f" No. {i} wrong."} for i in range(count)]


def prompt_rows(count: int = 8) -> list[dict[str, Any]]:
    """Returns prompts with exact-match answers (a random tiny model rarely hits them)."""
    return [{"prompt": f"What is {i} + {i}? Answer with the number.", "answer": str(2 * i)}
            for i in range(count)]


def trajectory_rows() -> list[dict[str, Any]]:
    """Returns agent traces with Thought/Action/Observation/Answer markers and one short trace."""
    rows: list[dict[str, Any]] = [
        {"prompt": f"What is {a}+{b}?",
         "text": f"Thought: I need to add {a} and {b}.\nAction: calculator[{a}+{b}]\n"
                 f"Observation: {a + b}\nThought: The tool says {a + b}.\nAnswer: {a + b}"}
        for a, b in [(12, 7), (3, 40), (25, 25), (8, 9)]
    ]
    rows.append({"prompt": "Say hi.", "text": "Thought: greet.\nAnswer: hello"})
    return rows


def write_datasets(folder: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Returns (paths, formats) of one small JSONL dataset per format, written under ``folder``."""
    rows = {"ds_sft": sft_rows(), "ds_pref": preference_rows(), "ds_prompts": prompt_rows(),
            "ds_traj": trajectory_rows()}
    paths = {key: write_jsonl(folder / f"{key}.jsonl", value) for key, value in rows.items()}
    return paths, dict(DATASET_FORMATS)


def run_spec(stages: list[dict[str, Any]], *, dropout: float = 0.0, **overrides: Any) -> RunSpec:
    """Returns a validated run spec on the tiny model with the test LoRA targets and these stages."""
    spec = {
        "base_model": "tiny",
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": dropout, "target_modules": TARGETS},
        "seed": 11,
        "stages": stages,
        "checkpoint_every_steps": 2,
        "keep_checkpoints": 2,
        "export": ["adapter", "merged"],
    }
    return RunSpec.model_validate({**spec, **overrides})


def sft_stage(dataset: str = "ds_sft", **fields: Any) -> dict[str, Any]:
    """Returns a short SFT stage dict (6 steps, eval split) with ``fields`` overriding."""
    return {"method": "sft", "datasets": [{"id": dataset}], "max_steps": 6, "batch_size": 4,
            "gradient_accumulation": 2, "learning_rate": 1e-2, "eval_fraction": 0.2, "eval_every_steps": 3,
            "max_seq_len": 64, **fields}


def dpo_stage(**fields: Any) -> dict[str, Any]:
    """Returns a short DPO stage dict (4 steps) with ``fields`` overriding."""
    return {"method": "dpo", "datasets": [{"id": "ds_pref"}], "max_steps": 4, "batch_size": 4,
            "learning_rate": 1e-2, "max_seq_len": 64, **fields}


def two_stage_spec(dropout: float = 0.0, **overrides: Any) -> RunSpec:
    """Returns an SFT (6 steps) → DPO (4 steps) spec on the tiny model."""
    return run_spec([sft_stage(), dpo_stage()], dropout=dropout, **overrides)


def rollout_context(
    work_dir: Path, model_dir: Path, stage: Any, records: list[dict], *, stage_index: int, seed: int,
    eval_records: list[dict], dropout: float = 0.0,
) -> tuple[Any, StageContext]:
    """Returns the toy task's LoRA policy (from a fixed start) and a stage context for a GRPO/PPO stage."""
    cpu = torch.device("cpu")
    adapter = LoraAdapter(r=8, alpha=16, dropout=dropout, target_modules=ROLLOUT_TARGETS)
    tokenizer = load_tokenizer(model_dir)
    torch.manual_seed(0)
    start = work_dir / "start"
    if not start.exists():
        save_policy_weights(load_policy(model_dir, adapter, cpu), start)
    model = load_policy(model_dir, adapter, cpu, start_dir=start)
    ctx = StageContext(
        stage=stage, stage_index=stage_index, seed=seed, adapter=adapter, tokenizer=tokenizer,
        train_records=records, eval_records=eval_records, device=cpu, work_dir=work_dir,
        reference=ReferencePolicy(start, adapter, cpu),
    )
    return model, ctx


def train_rollout_stage(
    work_dir: Path, model_dir: Path, stage: Any, records: list[dict], reporter: Any, *,
    stage_index: int, seed: int, eval_records: list[dict], checkpoint_every: int,
    resume_from: Path | None = None, dropout: float = 0.0,
) -> None:
    """Trains one GRPO/PPO stage on the toy task's LoRA from a fixed start (resumable)."""
    model, ctx = rollout_context(work_dir, model_dir, stage, records, stage_index=stage_index, seed=seed,
                                 eval_records=eval_records, dropout=dropout)
    train_stage(
        model, build_method(ctx), stage, stage_index=stage_index, stage_folder=work_dir / "stage",
        tokenizer=ctx.tokenizer, checkpoints=CheckpointPolicy(every_steps=checkpoint_every, keep=10),
        reporter=reporter, device=ctx.device, manifest_config={}, resume_from=resume_from,
    )
