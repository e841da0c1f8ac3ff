"""Peak memory of one SFT step with and without gradient checkpointing and chunked logits (CPU).

    .venv/bin/python bench/train_memory.py            # 151,936-token vocabulary, 1 x 2,048 tokens
    .venv/bin/python bench/train_memory.py --smoke    # seconds: tiny shapes in one process, asserts nothing

A random-init Llama built from a config (no download) with Qwen2.5's 151,936-token vocabulary
takes one LoRA SFT step (forward, backward, optimizer) on packed rows, exactly as
``trainer_core`` computes it (``head_inputs`` + ``sft_loss_from_hidden``), in four settings:
full-vocabulary logits in one piece or a chunk of positions at a time, each with activation
checkpointing off and on. Each setting runs in a fresh child process, whose peak RSS (VmHWM)
minus its RSS after loading the model is the step's peak; the four run alternately, ``--rounds``
times, and the median is printed. The same child also reports the loss, which must agree across
settings (the savings are free).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import REPO_ROOT, header, median, proc_status_kib

SETTINGS = [("full logits", False, False), ("full logits", True, False),
            ("chunked logits", False, True), ("chunked logits", True, True)]


def child(args: argparse.Namespace) -> dict:
    """Runs one SFT step in this process and returns its loss and peak memory."""
    import os

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO_ROOT))
    from trainer_core.config import LoraAdapter
    from trainer_core.losses.chunked import chunk_rows
    from trainer_core.losses.sft import sft_loss_from_hidden
    from trainer_core.modeling import head_inputs, load_policy, set_gradient_checkpointing

    torch.manual_seed(0)
    folder = Path(args.model_dir)
    if not (folder / "config.json").exists():
        heads = args.hidden // 64
        config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                             intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
                             num_attention_heads=heads,
                             num_key_value_heads=heads, tie_word_embeddings=False)
        LlamaForCausalLM(config).save_pretrained(folder)
    cpu = torch.device("cpu")
    model = load_policy(folder, LoraAdapter(r=16, alpha=32, dropout=0.0,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), cpu)
    set_gradient_checkpointing(model, args.checkpointing, cpu)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.rows, args.seq), generator=generator)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    positions = torch.arange(args.seq).expand(args.rows, -1)
    baseline = proc_status_kib(os.getpid(), "VmRSS")
    out = head_inputs(model, {"input_ids": ids, "position_ids": positions})
    rows = None if args.chunked else args.rows * args.seq  # one chunk = the full logits at once
    loss, _ = sft_loss_from_hidden(out.hidden, out.head, labels, vocab=out.vocab, rows=rows)
    loss.backward()
    optimizer.step()
    peak = proc_status_kib(os.getpid(), "VmHWM")
    return {"loss": float(loss), "peak_mib": (peak - baseline) / 1024,
            "chunk_rows": chunk_rows(out.vocab) if args.chunked else rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model-dir", default=None, help="where the random model is written once")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunked", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.vocab, args.hidden, args.layers, args.rows, args.seq, args.rounds = 4096, 128, 2, 1, 128, 1
    if args.child:
        print(json.dumps(child(args)))
        return
    import tempfile

    print(header("train_memory: one LoRA SFT step, peak RSS above the loaded model"))
    print(f"vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, {args.rows} x {args.seq} tokens")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or str(Path(tmp) / "model")
        results: dict[tuple[str, bool], list[dict]] = {}
        for _ in range(args.rounds):
            for name, checkpointing, chunked in SETTINGS:
                if args.smoke:  # the path only: one process (its peak memory means nothing then)
                    one = argparse.Namespace(**{**vars(args), "model_dir": model_dir,
                                                "checkpointing": checkpointing, "chunked": chunked})
                    results.setdefault((name, checkpointing), []).append(child(one))
                    continue
                argv = [sys.executable, __file__, "--child", "--model-dir", model_dir,
                        *(f"--{k}={getattr(args, k)}" for k in ("vocab", "hidden", "layers", "rows", "seq"))]
                argv += ["--checkpointing"] * checkpointing + ["--chunked"] * chunked
                done = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=REPO_ROOT)
                results.setdefault((name, checkpointing), []).append(json.loads(done.stdout.splitlines()[-1]))
    full_logits_gib = args.rows * args.seq * args.vocab * 4 / 2**30
    print(f"\nfp32 logits of the whole batch: {full_logits_gib:.2f} GiB")
    print(f"{'logits':<16}{'checkpointing':<15}{'peak MiB (median)':>18}{'loss':>14}")
    for (name, checkpointing), runs in results.items():
        peak = median([r["peak_mib"] for r in runs])
        print(f"{name:<16}{'on' if checkpointing else 'off':<15}{peak:>18,.0f}{runs[0]['loss']:>14.6f}")
    losses = {round(r["loss"], 4) for runs in results.values() for r in runs}
    print(f"\nlosses agree across settings: {len(losses) == 1} ({sorted(losses)})")
    print(header("end").splitlines()[-1])


if __name__ == "__main__":
    main()
