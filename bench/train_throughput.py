"""SFT training throughput: our SFT stage vs stock transformers.Trainer + peft, alternating, same data.

    .venv/bin/python bench/train_throughput.py                 # CPU, tiny model (4 layers × 256, vocab 2048)
    .venv/bin/python bench/train_throughput.py --device cuda   # GPU, Qwen2-0.5B-sized random model, MFU

Each run is a fresh subprocess (ours, baseline, ours, baseline, …) so neither inherits the other's
threads, caches or allocator state; the parent builds the model folder and data once and prints
real (non-padding) tokens/s per run, the ratio, and both losses. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from common import header, median
from train_data import LengthSpread, build_bench_model, make_records, measure_tokens_per_word

LOSS_TOLERANCE = 0.02
TARGET_RATIO = 1.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--model-size", choices=["tiny", "0.5b", "smoke"], help="default: tiny on cpu, 0.5b on cuda"
    )
    parser.add_argument("--examples", type=int, default=96, help="training examples (one epoch)")
    parser.add_argument("--heldout", type=int, default=48, help="held-out examples for the loss comparison")
    parser.add_argument("--rounds", type=int, default=5, help="(ours, baseline) pairs")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads per run; 0 = torch's default (all cores). One by default: on a "
        "shared machine a second OpenMP thread stalls at every barrier whenever its core is taken: "
        "timings then swing 10x and say more about the neighbours than about the trainers",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--median-len", type=float, default=160.0, help="median example length in tokens")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=989.0,
        help="accelerator peak for MFU (default: H100 SXM dense bf16)",
    )
    parser.add_argument("--work-dir", type=Path, help="default: a temporary folder")
    parser.add_argument("--smoke", action="store_true", help="a few seconds' run to check the script works")
    parser.add_argument("--worker", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.examples, args.heldout, args.rounds, args.max_seq_len, args.median_len = 16, 4, 1, 128, 48
        args.model_size = "smoke"
    args.model_size = args.model_size or ("0.5b" if args.device.startswith("cuda") else "tiny")
    return args


def bench_config(args: argparse.Namespace, model_dir: Path):  # noqa: ANN201 - imported lazily (torch)
    from train_runners import BenchConfig

    return BenchConfig(
        model_dir=str(model_dir),
        device=args.device,
        seed=args.seed,
        batch_size=args.batch_size,
        gradient_accumulation=args.grad_accum,
        learning_rate=args.lr,
        max_seq_len=args.max_seq_len,
        lora_r=args.lora_r,
        lora_dropout=args.lora_dropout,
    )


def worker_main(args: argparse.Namespace) -> None:
    """One timed run in this process; prints its RunResult as JSON on the last line."""
    from train_runners import BenchConfig, run_baseline, run_ours

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    state = json.loads((args.work_dir / "state.json").read_text())
    cfg = BenchConfig(**state["config"])
    out = args.work_dir / f"run-{args.worker}"
    if args.worker == "ours":
        result = run_ours(cfg, state["train"], state["heldout"], out)
    else:
        result = run_baseline(cfg, state["train"], state["heldout"], state["order"], out)
    print(json.dumps(result.to_json()))


def prepare(args: argparse.Namespace, work_dir: Path) -> dict:
    """Builds the model folder and the data; returns the state every worker reads."""
    from train_runners import initial_heldout_loss, planned_order, trainable_and_total_params
    from transformers import AutoTokenizer

    model_dir = build_bench_model(work_dir / f"model-{args.model_size}", args.model_size, seed=args.seed)
    tokens_per_word = measure_tokens_per_word(AutoTokenizer.from_pretrained(model_dir))
    spread = LengthSpread(median=args.median_len, max_len=args.max_seq_len)
    records = make_records(args.examples + args.heldout, spread, tokens_per_word, seed=args.seed)
    train, heldout = records[: args.examples], records[args.examples :]
    cfg = bench_config(args, model_dir)
    base_params, lora_params = trainable_and_total_params(cfg)
    return {
        "config": asdict(cfg),
        "train": train,
        "heldout": heldout,
        "order": planned_order(cfg, train, work_dir / "plan"),
        "initial_heldout_loss": initial_heldout_loss(cfg, heldout),
        "base_params": base_params,
        "lora_params": lora_params,
    }


def run_worker(trainer: str, work_dir: Path, in_process: bool, threads: int | None) -> dict:
    if in_process:  # --smoke: no fresh interpreter per run (saves the imports; timings not comparable)
        from train_runners import BenchConfig, run_baseline, run_ours

        state = json.loads((work_dir / "state.json").read_text())
        cfg, out = BenchConfig(**state["config"]), work_dir / f"run-{trainer}"
        if trainer == "ours":
            return run_ours(cfg, state["train"], state["heldout"], out).to_json()
        return run_baseline(cfg, state["train"], state["heldout"], state["order"], out).to_json()
    cmd = [sys.executable, __file__, "--worker", trainer, "--work-dir", str(work_dir)]
    cmd += ["--threads", str(threads)] if threads else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{trainer} run failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def describe_data(state: dict) -> str:
    from transformers import AutoTokenizer

    from trainer_core.data.render import render_sft

    cfg = state["config"]
    tokenizer = AutoTokenizer.from_pretrained(cfg["model_dir"])
    rendered = [render_sft(tokenizer, r, cfg["max_seq_len"], "right") for r in state["train"]]
    lengths = sorted(len(e) for e in rendered if e is not None)
    trained = sum(e.num_trained for e in rendered if e is not None)
    n = len(lengths)
    return (
        f"data: {n} train examples, {sum(lengths)} tokens ({trained / sum(lengths):.0%} trained), lengths "
        f"min {lengths[0]} p50 {lengths[n // 2]} p90 {lengths[int(0.9 * n)]} max {lengths[-1]} "
        f"mean {sum(lengths) / n:.0f}; held-out {len(state['heldout'])} examples"
    )


def report(args: argparse.Namespace, state: dict, runs: list[dict]) -> None:
    print(
        f"\n{'run':<10}{'loop s':>8}{'total s':>9}{'real tok':>10}{'model tok':>11}{'pad eff':>9}"
        f"{'real tok/s':>12}{'steps':>7}{'train loss':>12}{'held-out':>10}"
    )
    for run in runs:
        tps = run["real_tokens"] / run["seconds"]
        print(
            f"{run['trainer']:<10}{run['seconds']:>8.1f}{run['total_seconds']:>9.1f}{run['real_tokens']:>10}{run['padded_tokens']:>11}"
            f"{run['real_tokens'] / max(run['padded_tokens'], 1):>9.0%}{tps:>12.0f}{run['steps']:>7}"
            f"{run['last_train_loss']:>12.4f}{run['heldout_loss']:>10.4f}"
        )
    ours = [r for r in runs if r["trainer"] == "ours"]
    base = [r for r in runs if r["trainer"] == "baseline"]
    ours_tps = median([r["real_tokens"] / r["seconds"] for r in ours])
    base_tps = median([r["real_tokens"] / r["seconds"] for r in base])
    pair_ratios = [
        (o["real_tokens"] / o["seconds"]) / (b["real_tokens"] / b["seconds"])
        for o, b in zip(ours, base, strict=True)
    ]
    # Headline: the median of per-pair ratios. A pair's two runs are adjacent in time, so a load
    # swing on this shared machine moves both; the ratio of medians is printed alongside.
    ratio = median(pair_ratios)
    pairs = ", ".join(f"{x:.2f}" for x in pair_ratios)
    end_to_end = median([r["real_tokens"] / r["total_seconds"] for r in ours]) / median(
        [r["real_tokens"] / r["total_seconds"] for r in base]
    )
    print(
        f"\nreal tokens/s (median of {len(ours)}): ours {ours_tps:.0f}  baseline {base_tps:.0f}  "
        f"(ratio of medians {ours_tps / base_tps:.2f}x)\n"
        f"ratio ours/baseline, median of pairs: {ratio:.2f}x (pairs: {pairs}; "
        f"target >= {TARGET_RATIO}x: {'MET' if ratio >= TARGET_RATIO else 'MISSED'})"
    )
    cpu_ratio = median([r["real_tokens"] / r["cpu_seconds"] for r in ours]) / median(
        [r["real_tokens"] / r["cpu_seconds"] for r in base]
    )
    print(
        f"end to end (rendering + setup + loop): ratio {end_to_end:.2f}x; per CPU-second of the loop "
        f"(less sensitive to other load): ratio {cpu_ratio:.2f}x"
    )
    held_o, held_b = median([r["heldout_loss"] for r in ours]), median([r["heldout_loss"] for r in base])
    train_o, train_b = (
        median([r["last_train_loss"] for r in ours]),
        median([r["last_train_loss"] for r in base]),
    )
    held_diff = abs(held_o - held_b) / held_b
    print(
        f"held-out loss (same {len(state['heldout'])} examples, same function): ours {held_o:.7f}  "
        f"baseline {held_b:.7f}  relative diff {held_diff:.1e} (<= {LOSS_TOLERANCE:.0%}: "
        f"{'OK' if held_diff <= LOSS_TOLERANCE else 'NO'}); untrained {state['initial_heldout_loss']:.4f}"
    )
    print(
        f"mean train loss over the last steps (per-step token-mean CE as each trainer logs it): "
        f"ours {train_o:.7f}  baseline {train_b:.7f}  relative diff {abs(train_o - train_b) / train_b:.1e}"
    )
    if args.device.startswith("cuda"):
        flops_per_token = 6 * state["base_params"]
        for name, tps in (("ours", ours_tps), ("baseline", base_tps)):
            print(
                f"MFU {name}: {flops_per_token * tps / (args.peak_tflops * 1e12):.1%} "
                f"(6·N·tokens/s, N = {state['base_params'] / 1e6:.0f}M non-embedding params, "
                f"peak {args.peak_tflops:g} TFLOP/s)"
            )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return
    print(header(f"train_throughput ({args.device}, {args.model_size})"))
    with tempfile.TemporaryDirectory(prefix="tuneyard-bench-") as tmp:
        work_dir = args.work_dir or Path(tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        state = prepare(args, work_dir)
        (work_dir / "state.json").write_text(json.dumps(state))
        print(describe_data(state))
        print(
            f"batch {args.batch_size} x accum {args.grad_accum}, lr {args.lr} cosine, LoRA r={args.lora_r} "
            f"on q,k,v,o (dropout {args.lora_dropout}), 1 epoch, {args.rounds} rounds alternating, "
            f"torch threads {args.threads or 'default (all cores)'}"
        )
        runs = []
        for _ in range(args.rounds):
            for trainer in ("ours", "baseline"):
                runs.append(run_worker(trainer, work_dir, in_process=args.smoke, threads=args.threads))
                print(
                    f"  {trainer}: {runs[-1]['real_tokens'] / runs[-1]['seconds']:.0f} real tok/s", flush=True
                )
        report(args, state, runs)
        print(f"\nfinished at {header('end').splitlines()[1]}")


if __name__ == "__main__":
    main()
