"""Two processes (torchrun, gloo on CPU, FSDP2) train exactly like one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.integration.probe_logits import PROBE
from tests.unit.trainer_core.factories import (
    DATASET_FORMATS,
    dpo_stage,
    run_spec,
    sft_rows,
    sft_stage,
    write_datasets,
    write_jsonl,
)
from trainer_core.checkpoint import complete_checkpoints, read_manifest
from trainer_core.pipeline import run_pipeline
from trainer_core.reporting import RecordingReporter

ROOT = Path(__file__).resolve().parents[3]


def launch_ranks(count: int, spec_path: Path, model_dir: Path, data: Path, work: Path, out: Path) -> None:
    """Runs the distributed driver as ``count`` torchrun ranks and waits for them."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
         "--nproc_per_node", str(count), "-m", "tests.unit.trainer_core.distributed_driver",
         str(spec_path), str(model_dir), str(data), str(work), str(out)],
        cwd=ROOT, env=env, check=True, timeout=600,
    )


def _by_step(metrics: list, split: str, name: str) -> dict[tuple[int, int], float]:
    return {(stage, step): values[name] for stage, step, s, values in metrics
            if s == split and name in values}


@pytest.mark.timeout(600)
def test_two_ranks_match_one_process_for_sft_and_dpo(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_datasets(data)
    # 21 examples in micro-batches of 4: each epoch ends with a 1-example micro-batch, so the
    # second rank runs a filler on step 3.
    write_jsonl(data / "ds_sft.jsonl", sft_rows(21))
    spec = run_spec([sft_stage(max_steps=3, eval_fraction=0.0, eval_every_steps=None, eval_dataset="ds_traj"),
                     dpo_stage(max_steps=2, batch_size=3)], export=["adapter"], checkpoint_every_steps=2)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(spec.model_dump_json())

    one = RecordingReporter()
    paths = {key: data / f"{key}.jsonl" for key in DATASET_FORMATS}
    single = run_pipeline(spec, base_model_path=tiny_model_dir, dataset_paths=paths,
                          dataset_formats=dict(DATASET_FORMATS), work_dir=tmp_path / "one", reporter=one,
                          device="cpu")
    launch_ranks(2, spec_path, tiny_model_dir, data, tmp_path / "two", tmp_path / "two.json")
    two = json.loads((tmp_path / "two.json").read_text())

    assert two["status"] == "succeeded"
    for split, name in [("train", "loss"), ("train", "grad_norm"), ("eval", "eval_loss"),
                        ("train", "rewards/accuracies")]:
        expected = _by_step(one.metrics, split, name)
        got = _by_step(two["metrics"], split, name)
        assert set(got) == set(expected), (split, name)
        assert got == pytest.approx(expected, abs=1e-5), (split, name)
    assert len(_by_step(two["metrics"], "train", "loss")) == 5

    # The resume checkpoints hold the same files (plus the second rank's RNG) and the same weights.
    for stage in (0, 1):
        first = complete_checkpoints(tmp_path / "one" / f"stage-{stage}")[-1]
        second = complete_checkpoints(tmp_path / "two" / f"stage-{stage}")[-1]
        names = {f["path"] for f in read_manifest(first)["files"]}
        assert {f["path"] for f in read_manifest(second)["files"]} == names | {"rng-rank1.pt"}

    # The 2-process export loads in a fresh process with plain peft and gives the 1-process logits.
    exported = Path(two["exports"]["adapter"])
    assert sorted(p.name for p in exported.iterdir()) == sorted(
        p.name for p in single.exports["adapter"].iterdir())
    probe = tmp_path / "probe.json"
    subprocess.run([sys.executable, "-m", "tests.integration.probe_logits", "adapter", str(tiny_model_dir),
                    str(exported), str(probe)], cwd=ROOT, check=True, timeout=300)
    fresh = torch.tensor(json.loads(probe.read_text()))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                      single.exports["adapter"]).eval()
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)(PROBE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = model(input_ids=ids).logits[0]
    assert torch.allclose(fresh, reference, atol=1e-4)
