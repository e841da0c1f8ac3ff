"""The fit estimate against what a GPU really allocates: one SFT micro-batch step at the spec's shape.

    .venv/bin/python bench/fit_check.py MODEL_DIR [--batch-size 4] [--max-seq-len 512] [--full]

Trains one optimizer step of random full-length sequences (every token trained: the estimate's
upper bound) with the trainer's own model loading, LM-head projection and loss, and prints the
estimate's peak per device next to ``torch.cuda.max_memory_allocated``. Without CUDA it says so and
exits 0 (the CPU unit test compares the estimate with the tensor bytes autograd keeps).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from common import REPO_ROOT, header

sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from trainer_core.config import RunSpec  # noqa: E402
from trainer_core.estimate import estimate_fit  # noqa: E402
from trainer_core.losses.sft import sft_loss_from_hidden  # noqa: E402
from trainer_core.modeling import head_inputs, load_policy, set_gradient_checkpointing  # noqa: E402


def compare_estimate_with_cuda(model_dir: Path, spec: RunSpec) -> dict[str, Any]:
    """Returns the first stage's estimated peak and the measured CUDA peak of one training step."""
    stage = spec.stages[0]
    config = json.loads((model_dir / "config.json").read_text())
    estimate = estimate_fit(spec, config, device="cuda", device_name=torch.cuda.get_device_name())
    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats()
    model = load_policy(model_dir, spec.adapter, device)
    set_gradient_checkpointing(model, spec.gradient_checkpointing, device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable)
    ids = torch.randint(0, int(config["vocab_size"]), (stage.batch_size, stage.max_seq_len), device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = head_inputs(model, {"input_ids": ids})
        loss, _ = sft_loss_from_hidden(out.hidden, out.head, ids, vocab=out.vocab, reduction="sum")
    loss.backward()
    optimizer.step()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    predicted = estimate.stages[0].peak_memory_bytes_per_device
    return {"estimate_bytes": predicted, "measured_bytes": measured, "ratio": predicted / measured,
            "breakdown": estimate.as_dict()["stages"][0]["memory"], "device": torch.cuda.get_device_name()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA r=16")
    args = parser.parse_args()
    print(header("fit estimate vs torch.cuda.max_memory_allocated"))
    if not torch.cuda.is_available():
        print("no CUDA device here: nothing to measure "
              "(the CPU check is tests/unit/trainer_core/test_estimate.py)")
        return 0
    adapter = {"type": "full"} if args.full else {"type": "lora", "r": 16, "dropout": 0.0}
    spec = RunSpec.model_validate({
        "base_model": args.model_dir.name, "adapter": adapter,
        "export": ["merged"] if args.full else ["adapter"],
        "stages": [{"method": "sft", "datasets": [{"id": "random"}], "max_steps": 1,
                    "batch_size": args.batch_size, "max_seq_len": args.max_seq_len}],
    })
    print(json.dumps(compare_estimate_with_cuda(args.model_dir, spec), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
