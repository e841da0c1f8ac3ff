"""The two trainers the throughput bench compares, each run once per (fresh) process.

- `run_ours`: the SFT stage as the worker runs it — `trainer_core.methods.build_method` (renders,
  plans packed micro-batches) then `trainer_core.loop.train_stage` (one resume checkpoint at the end).
- `run_baseline`: stock `transformers.Trainer` on the same peft model, rendered with the same
  `render_sft`, padded per batch by `DataCollatorForSeq2Seq` (labels padded with -100).

Both time everything from the records to the trained adapter (rendering included), start from the
same LoRA initialisation (same seed, same `load_policy`), and see the same examples in the same
micro-batches: the baseline reads the examples in our planned order with the "sequential" sampler.
Losses are then measured by one function on one held-out set (`heldout_loss`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer_core.config import LoraAdapter, SFTStage
from trainer_core.data import IGNORE_INDEX
from trainer_core.data.render import RenderedExample, render_sft
from trainer_core.methods import build_method
from trainer_core.methods.base import StageContext
from trainer_core.modeling import ReferencePolicy, load_policy, load_tokenizer
from trainer_core.pipeline import seed_everything

LAST_STEPS = 10  # train losses averaged over this many final steps


@dataclass
class BenchConfig:
    """Everything both trainers share."""

    model_dir: str
    device: str
    seed: int
    batch_size: int
    gradient_accumulation: int
    learning_rate: float
    max_seq_len: int
    lora_r: int
    lora_dropout: float

    def adapter(self) -> LoraAdapter:
        return LoraAdapter(
            r=self.lora_r,
            alpha=2 * self.lora_r,
            dropout=self.lora_dropout,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        )

    def stage(self) -> SFTStage:
        return SFTStage(
            method="sft",
            datasets=[{"id": "bench"}],
            epochs=1.0,
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            gradient_accumulation=self.gradient_accumulation,
            max_seq_len=self.max_seq_len,
            lr_scheduler="cosine",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            packing=True,
        )


@dataclass
class RunResult:
    trainer: str
    seconds: float  # the training loop alone (train_stage / Trainer.train)
    total_seconds: float  # records to trained adapter: rendering, setup and the loop
    cpu_seconds: float  # CPU time of this process (all threads) during the loop: steadier under load
    real_tokens: int
    padded_tokens: int
    steps: int
    last_train_loss: float
    heldout_loss: float

    @property
    def tokens_per_second(self) -> float:
        return self.real_tokens / self.seconds

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _NullReporter:
    """Drops metrics but keeps the train losses; never asks to stop."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.tokens = 0

    def on_metrics(self, stage_index: int, step: int, split: str, values: dict[str, float]) -> None:
        if split == "train":
            self.losses.append(values["loss"])
            self.tokens += int(values["num_tokens"])

    def on_event(self, kind: str, message: str, data: dict | None = None) -> None: ...

    def on_checkpoint(self, info: Any) -> None: ...

    def on_checkpoint_removed(self, path: Path) -> None: ...

    def should_stop(self) -> bool:
        return False


def _context(cfg: BenchConfig, tokenizer: Any, records: list[dict], work_dir: Path) -> StageContext:
    device = torch.device(cfg.device)
    return StageContext(
        stage=cfg.stage(),
        stage_index=0,
        seed=cfg.seed,
        adapter=cfg.adapter(),
        tokenizer=tokenizer,
        train_records=records,
        eval_records=[],
        device=device,
        work_dir=work_dir,
        reference=ReferencePolicy(work_dir / "start", cfg.adapter(), device),
    )


def _policy(cfg: BenchConfig) -> nn.Module:
    # Same seed, same constructor: both trainers start from bit-identical LoRA weights.
    seed_everything(cfg.seed, 0)
    return load_policy(Path(cfg.model_dir), cfg.adapter(), torch.device(cfg.device))


def planned_order(cfg: BenchConfig, records: list[dict], work_dir: Path) -> list[int]:
    """Returns the example indices in the order our SFT method trains on them, micro-batch by micro-batch."""
    tokenizer = load_tokenizer(Path(cfg.model_dir))
    method = build_method(_context(cfg, tokenizer, records, work_dir))
    accumulation = cfg.gradient_accumulation
    return [
        i
        for step in range(1, method.total_steps + 1)
        for chunk in method.stream.micro_batches(step, accumulation)
        for i in chunk
    ]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_ours(cfg: BenchConfig, records: list[dict], heldout: list[dict], work_dir: Path) -> RunResult:
    """Returns the timing and losses of one SFT stage through trainer_core's method + loop."""
    from trainer_core.loop import CheckpointPolicy, train_stage

    tokenizer = load_tokenizer(Path(cfg.model_dir))
    model = _policy(cfg)
    reporter = _NullReporter()
    _sync(cfg.device)
    start = time.perf_counter()
    ctx = _context(cfg, tokenizer, records, work_dir)
    method = build_method(ctx)
    counted = _ModelTokens(method)
    loop_start, cpu_start = time.perf_counter(), time.process_time()
    outcome = train_stage(
        model,
        counted,
        ctx.stage,
        stage_index=0,
        stage_folder=work_dir,
        tokenizer=tokenizer,
        checkpoints=CheckpointPolicy(None, 1),
        reporter=reporter,
        device=ctx.device,
        manifest_config={"bench": True},
    )
    _sync(cfg.device)
    end, cpu = time.perf_counter(), time.process_time() - cpu_start
    last = reporter.losses[-LAST_STEPS:]
    return RunResult(
        "ours",
        end - loop_start,
        end - start,
        cpu,
        reporter.tokens,
        counted.padded,
        outcome.step,
        sum(last) / len(last),
        heldout_loss(model, _render(tokenizer, heldout, cfg.max_seq_len), cfg),
    )


class _ModelTokens:
    """Wraps a stage method and counts the tokens its micro-batches feed the model (padding included)."""

    def __init__(self, method: Any) -> None:
        self.method, self.padded = method, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.method, name)

    def micro_batches(self, model: nn.Module, step: int) -> list[Any]:
        batches = self.method.micro_batches(model, step)
        self.padded += sum(b.inputs["input_ids"].numel() for b in batches)
        return batches


def _render(tokenizer: Any, records: list[dict], max_seq_len: int) -> list[RenderedExample]:
    rendered = (render_sft(tokenizer, r, max_seq_len, "right") for r in records)
    return [e for e in rendered if e is not None]


class _PaddedTokens:
    """Counts what the baseline's collator actually hands the model (padding included)."""

    def __init__(self, collator: Any) -> None:
        self.collator, self.padded, self.real = collator, 0, 0

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.collator(features)
        self.padded += batch["input_ids"].numel()
        self.real += int(batch["attention_mask"].sum())
        return batch


def run_baseline(
    cfg: BenchConfig, records: list[dict], heldout: list[dict], order: list[int], work_dir: Path
) -> RunResult:
    """Returns the timing and losses of stock transformers.Trainer + peft with dynamic padding."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tokenizer = load_tokenizer(Path(cfg.model_dir))
    model = _policy(cfg)
    cuda = cfg.device.startswith("cuda")
    args = TrainingArguments(
        output_dir=str(work_dir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        optim="adamw_torch",
        num_train_epochs=1,
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not cuda,
        bf16=cuda,
        dataloader_num_workers=0,
        seed=cfg.seed,
        disable_tqdm=True,
    )
    _sync(cfg.device)
    start = time.perf_counter()
    examples = _render(tokenizer, records, cfg.max_seq_len)
    dataset = [
        {
            "input_ids": examples[i].input_ids,
            "attention_mask": [1] * len(examples[i]),
            "labels": examples[i].labels,
        }
        for i in order
    ]
    collator = _PaddedTokens(DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX))
    trainer = Trainer(model=model, args=args, data_collator=collator, train_dataset=dataset)
    loop_start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train()
    _sync(cfg.device)
    end, cpu = time.perf_counter(), time.process_time() - cpu_start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    last = losses[-LAST_STEPS:]
    return RunResult(
        "baseline",
        end - loop_start,
        end - start,
        cpu,
        collator.real,
        collator.padded,
        trainer.state.global_step,
        sum(last) / len(last),
        heldout_loss(model, _render(tokenizer, heldout, cfg.max_seq_len), cfg),
    )


@torch.no_grad()
def heldout_loss(model: nn.Module, examples: list[RenderedExample], cfg: BenchConfig) -> float:
    """Returns the mean token cross-entropy over the trained tokens of `examples` (one example per forward).

    Deliberately plain — full logits, no padding, no packing, float32 — and the same for both
    trainers, so the two numbers differ only by what training did to the weights.
    """
    model.eval()
    device = torch.device(cfg.device)
    total, count = 0.0, 0
    for example in examples:
        ids = torch.tensor([example.input_ids], device=device)
        labels = torch.tensor([example.labels], device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=ids).logits[:, :-1].float()
        target = labels[:, 1:]
        total += float(
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                target.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
        )
        count += int((target != IGNORE_INDEX).sum())
    model.train()
    return total / max(count, 1)


def initial_heldout_loss(cfg: BenchConfig, heldout: list[dict]) -> float:
    """Returns the held-out loss of the untrained policy (to show how far training moved it)."""
    tokenizer = load_tokenizer(Path(cfg.model_dir))
    return heldout_loss(_policy(cfg), _render(tokenizer, heldout, cfg.max_seq_len), cfg)


def trainable_and_total_params(cfg: BenchConfig) -> tuple[int, int]:
    """Returns (base parameters excluding the input embedding, LoRA parameters) for FLOP counting."""
    model = _policy(cfg)
    embedding = model.get_input_embeddings().weight.numel()
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) - embedding
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return base, lora
