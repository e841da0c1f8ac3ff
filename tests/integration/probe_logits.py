"""Logits of a fixed probe text, computed in a fresh process (run as a script by the tests).

    python -m tests.integration.probe_logits base BASE SCRATCH_DIR OUT.json
        the base model alone (to show training moved the logits)
    python -m tests.integration.probe_logits adapter BASE ADAPTER_DIR OUT.json
        base model + the downloaded PEFT adapter (PeftModel.from_pretrained), nothing of Tuneyard
    python -m tests.integration.probe_logits checkpoint BASE CHECKPOINT_DIR OUT.json R ALPHA
        base model + a fresh LoRA whose weights are replaced by the final resume checkpoint's
        `trainable.safetensors` — the tensors the worker's training loop held after its last step
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

PROBE = "What is 7 plus 7? It is 14."


def main(argv: list[str]) -> None:
    mode, base, folder, out = argv[0], Path(argv[1]), Path(argv[2]), Path(argv[3])
    torch.manual_seed(0)
    if mode == "base":
        folder.mkdir(parents=True, exist_ok=True)
        model = AutoModelForCausalLM.from_pretrained(base)
    elif mode == "adapter":
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)
    else:
        from trainer_core.checkpoint import load_trainable_weights
        from trainer_core.config import LoraAdapter
        from trainer_core.modeling import load_policy

        adapter = LoraAdapter(r=int(argv[4]), alpha=float(argv[5]), dropout=0.0)
        model = load_policy(base, adapter, torch.device("cpu"))
        load_trainable_weights(folder, model)
    model.eval()
    ids = AutoTokenizer.from_pretrained(base)(PROBE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    out.write_text(json.dumps(logits.tolist()))


if __name__ == "__main__":
    main(sys.argv[1:])
