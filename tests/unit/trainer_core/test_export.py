"""Adapter and merged exports: equal outputs, untouched training model, loadable in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from trainer_core.checkpoint import MANIFEST, export_adapter, export_merged, read_manifest
from trainer_core.config import LoraAdapter
from trainer_core.modeling import load_policy, load_tokenizer, trainable_parameters

CPU = torch.device("cpu")
IDS = [[1, 40, 41, 42, 43, 44, 45, 46], [1, 50, 60, 70, 80, 90, 100, 110]]


@pytest.fixture(scope="module")
def exported(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Returns (policy, adapter folder, merged folder) for a LoRA policy with non-zero B matrices."""
    torch.manual_seed(0)
    model = load_policy(tiny_model_dir, LoraAdapter(r=4, alpha=8, dropout=0.1), CPU)
    with torch.no_grad():
        for name, p in trainable_parameters(model).items():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    tokenizer = load_tokenizer(tiny_model_dir)
    out = tmp_path_factory.mktemp("export")
    adapter = export_adapter(model, tokenizer, out / "adapter", stage_index=0, step=3, config={"x": 1})
    merged = export_merged(model, tokenizer, out / "merged", base_model_dir=tiny_model_dir, stage_index=0,
                           step=3, config={"x": 1})
    assert (adapter.kind, merged.kind) == ("adapter", "merged")
    return model, adapter.path, merged.path


def _policy_logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits


def test_merged_equals_base_plus_adapter_and_policy_is_untouched(exported) -> None:
    from transformers import AutoModelForCausalLM

    model, _, merged_dir = exported
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        merged_logits = merged(input_ids=torch.tensor(IDS)).logits
    torch.testing.assert_close(merged_logits, _policy_logits(model), atol=1e-4, rtol=0)
    assert any("lora_B" in name for name in trainable_parameters(model))  # still a LoRA model
    with model.disable_adapter(), torch.no_grad():
        base_logits = model(input_ids=torch.tensor(IDS)).logits
    assert (base_logits - merged_logits).abs().max() > 1e-3  # the adapter really changes outputs


def test_export_folders_have_manifests(exported) -> None:
    _, adapter_dir, merged_dir = exported
    for folder in (adapter_dir, merged_dir):
        manifest = read_manifest(folder)
        names = {f["path"] for f in manifest["files"]}
        assert names == {p.name for p in folder.iterdir()} - {MANIFEST}
        assert "tokenizer.json" in names
        assert not folder.with_name(folder.name + ".tmp").exists()
    assert "adapter_model.safetensors" in {f["path"] for f in read_manifest(adapter_dir)["files"]}
    assert "model.safetensors" in {f["path"] for f in read_manifest(merged_dir)["files"]}


def test_exports_load_in_a_fresh_process(exported, tiny_model_dir: Path) -> None:
    model, adapter_dir, merged_dir = exported
    script = textwrap.dedent(f"""
        import json, torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        ids = torch.tensor({IDS})
        base = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r}, dtype=torch.float32)
        with torch.no_grad():
            adapter = PeftModel.from_pretrained(base, {str(adapter_dir)!r}).eval()(input_ids=ids).logits
            merged_model = AutoModelForCausalLM.from_pretrained({str(merged_dir)!r}).eval()
            merged = merged_model(input_ids=ids).logits
        print(json.dumps({{"adapter": adapter[:, -1, :8].tolist(), "merged": merged[:, -1, :8].tolist()}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    values = json.loads(result.stdout.strip().splitlines()[-1])
    expected = _policy_logits(model)[:, -1, :8]
    torch.testing.assert_close(torch.tensor(values["adapter"]), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(values["merged"]), expected, atol=1e-4, rtol=0)
