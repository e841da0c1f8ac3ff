"""The terminal client against one live service (the API and a worker on an embedded SQLite folder
with the tiny model): every command, through `python -m tuneyard_cli`, and the usual mistakes,
each ending in one line on stderr — never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.service import LiveService, free_port, prepare_database, start_api, start_worker, stop

REPO = Path(__file__).resolve().parents[2]
SPEC = {"name": "cli-sft", "base_model": "tiny-llama", "seed": 1,
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "stages": [{"method": "sft", "datasets": [{"id": "ds_sums"}], "max_steps": 4, "batch_size": 4,
                    "max_seq_len": 64, "learning_rate": 1e-3}],
        "checkpoint_every_steps": 2, "export": ["adapter", "merged"]}

Cli = Callable[..., subprocess.CompletedProcess]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[LiveService]:
    data_dir = tmp_path_factory.mktemp("tuneyard-cli")
    shutil.copytree(tiny_model_dir, data_dir / "models" / "tiny-llama")
    sessions, team_id, key = prepare_database(data_dir)
    api, base_url = start_api(data_dir, data_dir)
    live = LiveService(base_url, key, team_id, data_dir, sessions, [api])
    try:
        live.processes.append(start_worker(data_dir, data_dir, queues="train,cpu,eval"))
        yield live
    finally:
        for process in live.processes:
            stop(process)
        sessions.kw["bind"].dispose()


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEYARD_")}
    env.update(PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", **values)
    return env


def run_cli(*args: str, env: dict[str, str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuneyard_cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cli(service: LiveService) -> Cli:
    """Runs `tuneyard ARGS` as a user of the service would (URL and key in the environment)."""
    env = _env(TUNEYARD_URL=service.base_url, TUNEYARD_API_KEY=service.key,
               TUNEYARD_DATA_DIR=str(service.data_dir))

    def call(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        result = run_cli(*args, env=env)
        assert "Traceback" not in result.stderr, result.stderr
        if ok:
            assert result.returncode == 0, result.stdout + result.stderr
        return result

    return call


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_every_command_against_a_live_service(cli: Cli, service: LiveService, tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    created = cli("runs", "create", str(spec), "--data", "ds_sums=examples/sft.jsonl", "--follow").stdout
    assert "ds_sums = ds_" in created and "48 records" in created
    assert "stage 1 sft" in created and "4/4 steps in" in created and "s/step" in created
    run_id = created.split("run ", 1)[1].split(":", 1)[0]
    assert f"run {run_id}: succeeded" in created
    assert "exports:" in created and "tuneyard chat ckpt_" in created and "OpenAI(base_url=" in created

    shown = cli("runs", "get", run_id).stdout
    assert "stages" in shown and "stage 1 sft  succeeded  4/4 steps" in shown and "latest      loss" in shown
    run = json.loads(cli("runs", "get", run_id, "--json").stdout)
    dataset_id = run["spec"]["stages"][0]["datasets"][0]["id"]
    checkpoints = cli("checkpoints", "list", run_id).stdout.splitlines()
    adapter = next(line.split()[0] for line in checkpoints if " adapter " in line)
    assert any(" merged " in line for line in checkpoints) and any(" resume " in line for line in checkpoints)

    assert dataset_id in cli("datasets", "list").stdout
    dataset = cli("datasets", "get", dataset_id).stdout
    assert "ready" in dataset and "records 48" in dataset and "{" not in dataset  # stats read as text
    preview = cli("datasets", "preview", dataset_id, "--limit", "2").stdout.splitlines()
    assert len(preview) == 2 and "messages" in json.loads(preview[0])

    models = cli("models", "list").stdout
    assert "tiny-llama" in models and "LlamaForCausalLM" in models and adapter in models
    # Your own model: a folder checked and linked in under an ORG/NAME, then listed.
    tiny = service.data_dir / "models" / "tiny-llama"
    added = cli("models", "add", str(tiny), "--name", "me/tiny-copy").stdout
    assert "me/tiny-copy" in added and "LlamaForCausalLM" in added
    assert "me/tiny-copy" in cli("models", "list").stdout
    (tmp_path / "not-a-model").mkdir()
    error = one_line_error(cli("models", "add", str(tmp_path / "not-a-model"), ok=False))
    assert "no config.json" in error and "no weights" in error

    evaluated = cli("evals", "create", "--model", "tiny-llama", "--model", adapter, "--dataset", dataset_id,
                    "--metric", "loss", "--max-examples", "4").stdout
    eval_id = evaluated.split()[0]
    assert "succeeded" in evaluated and "loss" in evaluated and adapter in evaluated
    assert "tiny-llama" in cli("evals", "get", eval_id).stdout
    assert cli("chat", adapter, "What is 2 plus 3?", "--max-tokens", "4").stdout.strip() != ""


def test_the_usual_mistakes_are_one_line(cli: Cli, service: LiveService, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"base_model": "tiny-llama",\n "stages": [}\n')
    assert "bad.json is not valid JSON" in (line := one_line_error(cli("runs", "create", str(bad), ok=False)))
    assert "line 2 column 13" in line
    assert "no such file" in one_line_error(cli("runs", "create", str(tmp_path / "none.json"), ok=False))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    missing = one_line_error(cli("runs", "create", str(spec), ok=False))
    assert "dataset_not_found" in missing and "--data NAME=FILE" in missing
    assert "names no dataset 'ds_other'" in one_line_error(
        cli("runs", "create", str(spec), "--data", "ds_other=examples/sft.jsonl", ok=False))
    typo = json.loads(json.dumps(SPEC))
    typo["stages"][0]["learning_rat"] = 1e-3
    spec.write_text(json.dumps(typo))
    assert "did you mean `learning_rate`?" in one_line_error(cli("runs", "create", str(spec), ok=False))

    down = run_cli("runs", "list", env=_env(TUNEYARD_URL=f"http://127.0.0.1:{free_port()}",
                                            TUNEYARD_DATA_DIR=str(tmp_path)))
    assert "cannot reach the service" in one_line_error(down) and "tuneyard up" in down.stderr
    no_key = run_cli("runs", "list", env=_env(TUNEYARD_URL=service.base_url, TUNEYARD_DATA_DIR=str(tmp_path)))
    assert "set TUNEYARD_API_KEY" in one_line_error(no_key)
    # `keys create` outside the folder `tuneyard up` runs in: one line, and no empty database left behind.
    outside = run_cli("keys", "create", "--team", "x", env=_env(), cwd=tmp_path)
    assert "no Tuneyard database" in one_line_error(outside)
    assert not (tmp_path / ".tuneyard").exists()
