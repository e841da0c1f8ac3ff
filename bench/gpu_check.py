"""The single-GPU check: LoRA SFT speed and MFU against transformers.Trainer, QLoRA memory, rollouts.

    .venv/bin/python bench/gpu_check.py                  # one H100/H200-class GPU, about 8 minutes
    .venv/bin/python bench/gpu_check.py --smoke          # tiny shapes, runs on CPU: checks the script

Nothing is downloaded: every model is random-initialised from a config shaped like a real one
(Qwen2.5-0.5B, Llama-3-8B), so the figures are speed and memory, never quality. Sections:

1. LoRA SFT at 4k-token packed rows on both shapes: ours (``trainer_core``: padding-free rows,
   flash-attention varlen or flex attention, chunked logits, activation checkpointing, bf16
   autocast) against ``transformers.Trainer`` + peft (padded batches, SDPA or flash-attention,
   full logits) in the same run: tokens/s, MFU, peak memory.
2. QLoRA on the 8B shape: peak memory of one step at 4k tokens (target: under 24 GB).
3. One GRPO rollout with each engine that can run here (local, paged; SGLang only with
   ``--sglang-url``): rollout tokens/s.
4. The fit estimate (``trainer_core.estimate``) of section 1's step next to the
   ``torch.cuda.max_memory_allocated`` that step reached.
5. The ``gpu``-marked tests (``pytest -m gpu``).

Whatever cannot run (no CUDA, flash-attn, liger-kernel, bitsandbytes, SGLang) is skipped and the
report says so. It writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out-dir``.

MFU counts 6·N·tokens (N: all parameters, PaLM's convention, arXiv 2204.02311 app. B) plus the
attention matmuls 12·layers·hidden·(mean attended length) per token, over the GPU's dense bf16
peak (``--peak-tflops``; H100/H200 SXM: 989).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import REPO_ROOT, header

sys.path.insert(0, str(REPO_ROOT))

SHAPES: dict[str, dict[str, Any]] = {
    # Qwen2.5-0.5B's config (hidden 896, 24 layers, GQA 14/2, 151,936 vocabulary, tied embeddings).
    "qwen2.5-0.5b": {
        "arch": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151_936,
        "tie_word_embeddings": True,
    },
    # Llama-3-8B's config (hidden 4096, 32 layers, GQA 32/8, 128,256 vocabulary).
    "llama-3-8b": {
        "arch": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128_256,
        "tie_word_embeddings": False,
    },
}
SMOKE_SHAPES: dict[str, dict[str, Any]] = {
    name: {
        **shape,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1024,
    }
    for name, shape in SHAPES.items()
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Setup:
    device: Any
    smoke: bool
    seq: int
    steps: int
    peak_tflops: float


def available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def build_model(shape: dict[str, Any], dtype: Any, device: Any) -> Any:
    """Returns a random-init causal LM of ``shape`` on ``device`` (no download)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    fields = {k: v for k, v in shape.items() if k != "arch"}
    config_cls, model_cls = (
        (Qwen2Config, Qwen2ForCausalLM) if shape["arch"] == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    )
    with torch.device(device):
        model = model_cls(config_cls(**fields, attn_implementation="sdpa"))
    return model.to(dtype)


def lengths_for(total: int, seed: int) -> list[int]:
    """Returns example lengths (log-normal around 600 tokens) filling one ``total``-token row."""
    import random

    rng, out = random.Random(seed), []
    while sum(out) < total:
        out.append(max(16, min(total - sum(out), int(rng.lognormvariate(6.4, 0.6)))))
    return out


def flops_per_token(model: Any, mean_context: float) -> float:
    config = model.config
    params = sum(p.numel() for p in model.parameters())
    return 6 * params + 12 * config.num_hidden_layers * config.hidden_size * mean_context


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_gib(device: Any) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def _reset_peak(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def ours_sft(shape: dict[str, Any], setup: Setup) -> dict[str, Any]:
    """Returns tokens/s, MFU and peak memory of trainer_core's LoRA SFT step on packed 4k rows."""
    import torch
    from peft import LoraConfig, get_peft_model

    from trainer_core.data.packing import collate_flat, collate_packed
    from trainer_core.data.render import RenderedExample
    from trainer_core.losses.sft import sft_loss_from_hidden
    from trainer_core.modeling import (
        ATTENTION_IMPLEMENTATION,
        document_mask,
        head_inputs,
        packed_attention,
        set_gradient_checkpointing,
        use_attention,
    )

    device = setup.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    _reset_peak(device)
    model = get_peft_model(
        build_model(shape, dtype, device),
        LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"),
    )
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    attention = packed_attention(device)
    if attention != "dense_mask":
        use_attention(model, ATTENTION_IMPLEMENTATION[attention])
    checkpointing = set_gradient_checkpointing(model, None, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = shape["vocab_size"]
    times, tokens = [], 0
    for step in range(setup.steps + 1):
        generator = torch.Generator().manual_seed(step)
        examples = [
            RenderedExample(torch.randint(0, vocab, (n,), generator=generator).tolist(), [1] * n)
            for n in lengths_for(setup.seq, step)
        ]
        if attention == "dense_mask":
            batch = collate_packed([examples], 0)
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids")}
        else:
            batch = collate_flat(examples, 0)
            inputs = {k: batch[k].to(device) for k in ("input_ids", "position_ids")}
            if attention == "flex":
                inputs["attention_mask"] = document_mask(batch["seq_lengths"], device)
        labels = batch["labels"].to(device)
        _sync(device)
        started = time.perf_counter()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()
        with autocast:
            out = head_inputs(model, inputs)
            loss, _ = sft_loss_from_hidden(
                out.hidden, out.head, labels, vocab=out.vocab, head_weight=out.head_weight
            )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if step:  # the first step compiles kernels and warms the allocator
            times.append(time.perf_counter() - started)
            tokens += int(batch["num_tokens"])
    mean_context = sum(n * n for n in lengths_for(setup.seq, 1)) / (2 * setup.seq)
    per_second = tokens / sum(times)
    result = {
        "trainer": "trainer_core",
        "attention": attention,
        "gradient_checkpointing": checkpointing,
        "tokens_per_second": per_second,
        "peak_gib": _peak_gib(device),
        "mfu": per_second * flops_per_token(model, mean_context) / (setup.peak_tflops * 1e12),
    }
    del model, optimizer
    return result


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def fit_estimate(shape: dict[str, Any], setup: Setup, measured: dict[str, Any]) -> dict[str, Any]:
    """Returns the fit estimate's per-device peak for ``ours_sft``'s step next to the peak it measured.

    The same step as a run spec: LoRA r=16 on the seven linear layers, no dropout, one packed
    ``setup.seq``-token row per micro-batch, gradient checkpointing as on CUDA by default.
    """
    from trainer_core.config import RunSpec
    from trainer_core.estimate import estimate_fit

    spec = RunSpec.model_validate({
        "base_model": "shape", "adapter": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.0,
                                           "target_modules": LORA_TARGETS},
        "stages": [{"method": "sft", "datasets": [{"id": "random"}], "max_steps": setup.steps,
                    "batch_size": 1, "max_seq_len": setup.seq}],
    })
    config = {k: v for k, v in shape.items() if k != "arch"}
    estimate = estimate_fit(spec, config, device=setup.device.type)
    predicted = estimate.peak_memory_bytes_per_device / 2**30
    peak = measured.get("peak_gib")
    return {"estimate_gib": predicted, "measured_gib": peak,
            "estimate_over_measured": predicted / peak if peak else None,
            "breakdown_gib": {k: v / 2**30 for k, v in estimate.as_dict()["stages"][0]["memory"].items()}}


def trainer_sft(shape: dict[str, Any], setup: Setup) -> dict[str, Any]:
    """Returns the same figures for transformers.Trainer + peft on the same examples, padded per batch."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    device = setup.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    _reset_peak(device)
    model = build_model(shape, dtype, device)
    implementation = "flash_attention_2" if device.type == "cuda" and available("flash_attn") else "sdpa"
    model.set_attn_implementation(implementation)
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    )
    vocab = shape["vocab_size"]
    rows = []
    for step in range(setup.steps + 1):
        generator = torch.Generator().manual_seed(step)
        rows.append(
            [
                torch.randint(0, vocab, (n,), generator=generator).tolist()
                for n in lengths_for(setup.seq, step)
            ]
        )
    per_step = max(len(r) for r in rows)
    examples = [{"input_ids": ids, "labels": ids} for row in rows for ids in row[:per_step]]

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = (
                torch.tensor(b["input_ids"]),
                torch.tensor(b["labels"]),
                1,
            )
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    timings: list[float] = []
    seen: list[int] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            _sync(device)
            self.started = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            _sync(device)
            if state.global_step > 1:
                timings.append(time.perf_counter() - self.started)

    batch_size = max(1, len(rows[0]))
    args = TrainingArguments(
        output_dir=str(setup_dir()),
        per_device_train_batch_size=batch_size,
        max_steps=setup.steps + 1,
        learning_rate=1e-4,
        bf16=device.type == "cuda",
        gradient_checkpointing=device.type == "cuda",
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=device.type != "cuda",
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=examples, data_collator=collate, callbacks=[Timer()]
    )
    trainer.train()
    real = sum(len(e["input_ids"]) for e in examples[batch_size : batch_size * (setup.steps + 1)])
    seen.append(real)
    per_second = real / max(sum(timings), 1e-9) if timings else float("nan")
    mean_context = sum(n * n for n in lengths_for(setup.seq, 1)) / (2 * setup.seq)
    result = {
        "trainer": "transformers.Trainer",
        "attention": implementation,
        "tokens_per_second": per_second,
        "peak_gib": _peak_gib(device),
        "mfu": per_second * flops_per_token(model, mean_context) / (setup.peak_tflops * 1e12),
    }
    del trainer, model
    return result


def setup_dir() -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix="gpu_check_"))


def qlora_memory(shape: dict[str, Any], setup: Setup) -> dict[str, Any]:
    """Returns the peak memory of one QLoRA step (nf4 base, LoRA r=16, checkpointing) at ``setup.seq``."""
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model

    from trainer_core.losses.sft import sft_loss_from_hidden
    from trainer_core.modeling import head_inputs, set_gradient_checkpointing

    device = setup.device
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(shape, compute, "cpu" if device.type != "cuda" else device)
    # Quantise every decoder linear in place (what from_pretrained with BitsAndBytesConfig does).
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child_name != "lm_head":
                quantized = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=False,
                    compute_dtype=compute,
                    quant_type="nf4",
                    device="meta",
                )
                quantized.weight = bnb.nn.Params4bit(
                    child.weight.data.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True
                )
                setattr(module, child_name, quantized.to(device))
    model.to(device)
    _reset_peak(device)
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    )
    set_gradient_checkpointing(model, True, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, shape["vocab_size"], (1, setup.seq), device=device)
    labels = torch.roll(ids, -1, 1)
    started = time.perf_counter()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()
    with autocast:
        out = head_inputs(model, {"input_ids": ids})
        loss, _ = sft_loss_from_hidden(out.hidden, out.head, labels, vocab=out.vocab)
    loss.backward()
    optimizer.step()
    _sync(device)
    result = {
        "peak_gib": _peak_gib(device),
        "step_seconds": time.perf_counter() - started,
        "tokens": setup.seq,
        "target_gib": 24,
    }
    del model, optimizer
    return result


def rollouts(shape: dict[str, Any], setup: Setup, sglang_url: str | None) -> list[dict[str, Any]]:
    """Returns rollout tokens/s of one GRPO sampling batch (16 prompts x 8 completions) per engine."""
    import torch
    from peft import LoraConfig, get_peft_model

    from trainer_core.config import RolloutSpec
    from trainer_core.generation import seeded_generator
    from trainer_core.rollout_engines import build_engine

    device = setup.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = get_peft_model(
        build_model(shape, dtype, device),
        LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"),
    )
    prompts_n, group, new_tokens = (2, 2, 8) if setup.smoke else (16, 8, 256)
    generator = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(10, shape["vocab_size"], (int(n),), generator=generator).tolist()
        for n in torch.randint(32, 128, (prompts_n,), generator=generator)
    ]
    out = []
    for engine_name in ("local", "paged", "sglang"):
        if engine_name == "sglang" and not sglang_url:
            out.append(
                {"engine": "sglang", "skipped": "no --sglang-url (SGLang is not installed with Tuneyard)"}
            )
            continue
        engine = build_engine(
            RolloutSpec(engine=engine_name),
            sglang_url=sglang_url,
            work_dir=setup_dir(),
            name_prefix="gpu-check",
        )
        _sync(device)
        started = time.perf_counter()
        # Never an eos: every completion runs max_new_tokens, so the engines do equal work.
        done = engine.sample(
            model,
            [p for p in prompts for _ in range(group)],
            version=0,
            max_new_tokens=new_tokens,
            eos_token_ids=[-1],
            pad_token_id=0,
            generator=seeded_generator(0, device=device),
            temperature=1.0,
            top_p=1.0,
        )
        _sync(device)
        seconds = time.perf_counter() - started
        engine.close()
        generated = int(done.completion_mask.sum())
        out.append(
            {
                "engine": engine_name,
                "completions": len(prompts) * group,
                "tokens": generated,
                "seconds": seconds,
                "tokens_per_second": generated / seconds,
            }
        )
    return out


def gpu_tests(smoke: bool) -> dict[str, Any]:
    """Returns the outcome of ``pytest -m gpu`` (its last line)."""
    if smoke:
        return {"skipped": "--smoke"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return {"returncode": done.returncode, "summary": lines[-1] if lines else done.stderr[-500:]}


def section(report: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    """Runs one section, recording its result or why it could not run."""
    started = time.perf_counter()
    try:
        report[name] = fn()
    except Exception as exc:  # a failed section must not hide the others' figures
        report[name] = {"error": f"{type(exc).__name__}: {exc}"}
    print(f"  {name}: {time.perf_counter() - started:.1f} s", flush=True)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# GPU check ({report['device']})", "", f"{report['started']}; {report['environment']}", ""]
    lines += ["| section | result |", "|---|---|"]
    for key, value in report.items():
        if key in ("device", "started", "environment"):
            continue
        lines.append(f"| {key} | `{json.dumps(value, default=str)[:600]}` |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out-dir", default="bench/out")
    parser.add_argument("--seq", type=int, default=4096, help="tokens per packed row")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per trainer (after one warm-up)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    parser.add_argument("--sglang-url", default=None, help="an SGLang server (--enable-lora) for its engine")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device there is")
    args = parser.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("no CUDA device: run with --smoke to check the script on CPU; nothing measured")
        sys.exit(2)
    device = torch.device("cuda" if cuda else "cpu")
    setup = Setup(
        device, args.smoke, 256 if args.smoke else args.seq, 2 if args.smoke else args.steps, args.peak_tflops
    )
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    print(header("gpu_check" + (" (smoke: tiny shapes, figures meaningless)" if args.smoke else "")))
    packages = {m: available(m) for m in ("flash_attn", "liger_kernel", "bitsandbytes", "sglang")}
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (smoke)",
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "environment": f"torch {torch.__version__}, packages {packages}",
    }
    for name, shape in shapes.items():
        section(report, f"sft/{name}/ours", lambda shape=shape: ours_sft(shape, setup))
        section(report, f"sft/{name}/trainer", lambda shape=shape: trainer_sft(shape, setup))
        ours, base = report[f"sft/{name}/ours"], report[f"sft/{name}/trainer"]
        if "tokens_per_second" in ours and "tokens_per_second" in base:
            report[f"sft/{name}/speedup"] = ours["tokens_per_second"] / base["tokens_per_second"]
        if "tokens_per_second" in ours:
            section(report, f"fit_estimate/{name}",
                    lambda shape=shape, ours=ours: fit_estimate(shape, setup, ours))
    if packages["bitsandbytes"]:
        section(report, "qlora/llama-3-8b", lambda: qlora_memory(shapes["llama-3-8b"], setup))
    else:
        report["qlora/llama-3-8b"] = {"skipped": "bitsandbytes is not installed"}
    section(report, "rollouts/qwen2.5-0.5b", lambda: rollouts(shapes["qwen2.5-0.5b"], setup, args.sglang_url))
    section(report, "tests -m gpu", lambda: gpu_tests(args.smoke))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "gpu_check.md").write_text(markdown(report))
    print(json.dumps(report, indent=2, default=str))
    print(f"wrote {out_dir / 'gpu_check.json'} and {out_dir / 'gpu_check.md'}")
    if any(isinstance(v, dict) and "error" in v for v in report.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
