"""The embedded default end to end: `tuneyard up --demo --port P` (SQLite, kombu filesystem broker,
one worker and the reaper as subprocesses) prints its banner last and trains its demo run; the
terminal client, with nothing but the data folder to go on, follows it, lists it and downloads its
adapter (sha256-verified); an upload becomes ready while a run trains. Ctrl-C stops everything
without a traceback, and a restart reuses the key and does not submit the demo again."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.integration.conftest import FAST, REPO, free_port, wait_for

# The banner, and nothing after it while the service runs.
BANNER = re.compile(r"Tuneyard is ready at (\S+) .*\nAPI key .*\n  (ty_\S+)\n(?s:.*)runs follow (run_\w+)"
                    r"(?s:.*)Ctrl-C stops the API, the worker and the reaper\.\n$")


def _up(env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tuneyard_cli", "up", "--demo", "--port", str(port)],
                            cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _interrupt(up: subprocess.Popen, log: Path) -> str:
    """Returns up's whole output after a Ctrl-C (SIGINT to `up` alone, as a terminal sends it)."""
    up.send_signal(signal.SIGINT)
    up.wait(60)
    return log.read_text()


def test_up_demo_trains_on_the_embedded_stack(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEYARD_")}
    env.update({f"TUNEYARD_{k.upper()}": v for k, v in FAST.items()})
    env.update(TUNEYARD_DATA_DIR=str(tmp_path / "data"), TUNEYARD_ENV="test",
               PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    log = tmp_path / "up.log"
    up = _up(env, port, log)
    try:
        found = wait_for(lambda: BANNER.search(log.read_text()), 180, "the banner, last", every=0.5)
        url, key, run_id = found.groups()
        assert url == f"http://127.0.0.1:{port}" and "new key" in log.read_text()
        # The client finds the service and the key from the data folder alone (a new shell here).
        client_env = {**env, "TUNEYARD_URL": "", "TUNEYARD_API_KEY": ""}

        def tuneyard(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "tuneyard_cli", *args], cwd=REPO, env=client_env,
                                  capture_output=True, text=True, timeout=300)

        follow = tuneyard("runs", "follow", run_id)
        assert follow.returncode == 0, follow.stdout + follow.stderr
        assert f"run {run_id}: succeeded" in follow.stdout
        assert run_id in tuneyard("runs", "list").stdout

        api = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"})
        run = api.get(f"/v1/runs/{run_id}").json()
        assert run["status"] == "succeeded" and run["stages"][0]["step"] == 30
        listed = api.get(f"/v1/runs/{run_id}/checkpoints").json()["data"]
        adapter = next(c for c in listed if c["kind"] == "adapter")
        target = tmp_path / "download"
        # A partial file left by an interrupted download is resumed with a Range request.
        weights = next(f for f in adapter["files"] if f["path"].endswith(".safetensors"))
        partial = api.get(f"/v1/checkpoints/{adapter['id']}/files/{weights['path']}",
                          headers={"Range": "bytes=0-999"}).content
        (target / weights["path"]).parent.mkdir(parents=True, exist_ok=True)
        (target / (weights["path"] + ".part")).write_bytes(partial)
        download = tuneyard("checkpoints", "download", adapter["id"], str(target))
        assert download.returncode == 0, download.stdout + download.stderr
        assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()) == sorted(
            f["path"] for f in adapter["files"])

        # The one worker has a second pool process: a dataset is validated while a run trains.
        demo_dataset = run["spec"]["stages"][0]["datasets"][0]["id"]
        long_spec = {"name": "long", "base_model": "tiny-llama", "checkpoint_every_steps": 1000,
                     "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                     "stages": [{"method": "sft", "datasets": [{"id": demo_dataset}], "max_steps": 5000,
                                 "batch_size": 4, "max_seq_len": 64}]}
        long_run = api.post("/v1/runs", json=long_spec).json()["id"]
        wait_for(lambda: api.get(f"/v1/runs/{long_run}").json()["stages"][0]["step"] > 0, 120,
                 "the long run to train")
        records = "".join(json.dumps({"prompt": f"{i}?", "completion": f" {i}."}) + "\n" for i in range(20))
        uploaded = api.post("/v1/datasets", content=records.encode(), params={"format": "sft"},
                            headers={"Content-Type": "application/jsonl"}).json()
        ready = wait_for(lambda: (d := api.get(f"/v1/datasets/{uploaded['id']}").json())["status"]
                         != "validating" and d, 60, "the upload to be validated while a run trains")
        assert ready["status"] == "ready" and ready["num_records"] == 20
        training = api.get(f"/v1/runs/{long_run}").json()
        assert training["status"] == "running" and training["stages"][0]["step"] < 5000
        api.post(f"/v1/runs/{long_run}/cancel")
        wait_for(lambda: api.get(f"/v1/runs/{long_run}").json()["status"] == "cancelled", 60,
                 "the long run to cancel")
        first = _interrupt(up, log)
        assert first.rstrip().endswith("stopped") and "Traceback" not in first

        up = _up(env, port, log)
        again = wait_for(lambda: BANNER.search(log.read_text()), 180, "the banner after a restart", every=0.5)
        assert again.group(2) == key and "the key from the first start" in log.read_text()
        assert again.group(3) == run_id  # the demo is not submitted twice
        assert [r["name"] for r in api.get("/v1/runs").json()["data"]].count("demo-sft") == 1
        second = _interrupt(up, log)
        assert second.rstrip().endswith("stopped") and "Traceback" not in second
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait(10)
