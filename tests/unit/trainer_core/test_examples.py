"""examples/ stays usable: specs validate, datasets validate in the format their stages need, and
the three-stage `python -m trainer_core run` command pasted in examples/README.md trains to the end."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_core.config import METHOD_FORMATS, RunSpec
from trainer_core.data.validate import validate_jsonl

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "examples"
DATASET_FILES = {"ds_sft": "sft.jsonl", "ds_pref": "preference.jsonl", "ds_prompts": "prompts.jsonl",
                 "ds_traj": "trajectories.jsonl", "ds_programs_sft": "programs_sft.jsonl",
                 "ds_programs": "programs.jsonl", "ds_programs_eval": "programs_eval.jsonl"}
DATASET_FORMATS = {"ds_sft": "sft", "ds_pref": "preference", "ds_prompts": "prompts",
                   "ds_traj": "trajectories", "ds_programs_sft": "sft", "ds_programs": "prompts",
                   "ds_programs_eval": "prompts"}
SPECS = sorted(EXAMPLES.glob("*.json"))


def _readme_run_commands() -> list[str]:
    lines = (EXAMPLES / "README.md").read_text().splitlines()
    return [line.strip() for line in lines if line.strip().startswith("python -m trainer_core run ")]


def test_every_dataset_file_is_valid_and_detected_as_its_format() -> None:
    for dataset_id, name in DATASET_FILES.items():
        with (EXAMPLES / name).open("rb") as stream:
            report = validate_jsonl(stream, None)  # detected, as the CLI and a format-less upload do
        assert report.ok, (name, report.errors)
        assert report.format == DATASET_FORMATS[dataset_id]


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_spec_validates_and_names_example_datasets_of_the_right_format(path: Path) -> None:
    spec = RunSpec.model_validate_json(path.read_text())
    assert spec.base_model == "tiny-llama"
    for stage in spec.stages:
        for ref in stage.datasets:
            with (EXAMPLES / DATASET_FILES[ref.id]).open("rb") as stream:
                assert validate_jsonl(stream, None).format in METHOD_FORMATS[stage.method]


def test_readme_has_a_run_command_for_every_spec() -> None:
    named = {shlex.split(command)[4] for command in _readme_run_commands()}
    assert named == {f"examples/{p.name}" for p in SPECS}


def test_readme_three_stage_command_trains_to_the_end(tiny_model_dir: Path, tmp_path: Path) -> None:
    # sft.json is its first stage and sad.json's stages run in test_pipeline_stages, so one
    # subprocess run keeps the suite short.
    (command,) = [c for c in _readme_run_commands() if shlex.split(c)[4] == "examples/sft_dpo_grpo.json"]
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny-llama").symlink_to(tiny_model_dir)
    argv = shlex.split(command.replace("/tmp/models", str(models)))
    argv[argv.index("--out") + 1] = str(tmp_path / "out")
    # One intra-op thread: on a shared CPU torch's spinning worker threads made this run 6x slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{\n"):])
    assert summary["status"] == "succeeded" and set(summary["exports"]) == {"adapter", "merged"}
    assert all(Path(folder, "manifest.json").is_file() for folder in summary["exports"].values())
