"""Train → try it → compare, on the production-shaped stack (PostgreSQL, Redis, uvicorn, real Celery
workers): a run fine-tunes the greeting task, its exported checkpoints are served through the
OpenAI API (by id and by alias) and an eval on the held-out split shows the fine-tune better."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import openai
import pytest

from tests.inference_support import ANSWERS, BASE_MODEL, greeting_records, run_spec
from tests.integration.conftest import REPO, Stack, Worker, service_env, upload, wait_for, wait_status

HELLO = [{"role": "user", "content": "what is the city hello"}]


@pytest.fixture(scope="module")
def eval_worker(stack: Stack) -> Iterator[Worker]:
    """A Celery worker subprocess consuming only the `eval` queue."""
    log = stack.logs / "worker-eval.log"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.celery_app",
            "worker",
            "-Q",
            "eval",
            "-c",
            "1",
            "--without-mingle",
            "--without-gossip",
            "--loglevel",
            "INFO",
            "-n",
            "it-eval@%h",
        ],
        cwd=REPO,
        env=service_env(stack.settings),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    worker = Worker(process, log)
    try:
        wait_for(lambda: " ready." in worker.text() or process.poll() is not None, 90, "eval worker ready")
        assert process.poll() is None, worker.text()[-3000:]
        yield worker
    finally:
        worker.stop()


def test_a_finished_run_is_served_and_beats_its_base_model(stack: Stack, eval_worker: Worker) -> None:
    stack.start_worker()
    http = stack.client()
    train_id = upload(http, greeting_records(64, seed=0), "sft")
    held_out_id = upload(http, greeting_records(16, seed=1), "sft")
    spec = run_spec()
    spec["stages"][0]["datasets"] = [{"id": train_id}]
    created = http.post("/v1/runs", json=spec)
    assert created.status_code == 201, created.text
    run = wait_status(http, created.json()["id"], {"succeeded", "failed"}, timeout=600)
    assert run["status"] == "succeeded", run["error"]
    exports = {
        c["kind"]: c["id"]
        for c in http.get(f"/v1/runs/{run['id']}/checkpoints", params={"limit": 100}).json()["data"]
        if c["kind"] in ("adapter", "merged")
    }
    assert set(exports) == {"adapter", "merged"}

    api = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.key, max_retries=0, timeout=120)
    assert {BASE_MODEL, *exports.values()} <= {m.id for m in api.models.list().data}
    by_id = api.chat.completions.create(model=exports["adapter"], messages=HELLO, max_tokens=8, temperature=0)
    by_alias = api.chat.completions.create(model=spec["name"], messages=HELLO, max_tokens=8, temperature=0)
    assert by_alias.model == exports["adapter"]
    assert by_id.choices[0].message.content == by_alias.choices[0].message.content == ANSWERS["hello"]
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in api.chat.completions.create(
            model=exports["merged"], messages=HELLO, max_tokens=8, temperature=0, stream=True
        )
    )
    assert streamed == ANSWERS["hello"]

    evaluation = http.post(
        "/v1/evals",
        json={
            "models": [BASE_MODEL, exports["adapter"]],
            "dataset_id": held_out_id,
            "metrics": ["loss", "exact_match"],
            "generation": {"max_tokens": 8},
        },
    )
    assert evaluation.status_code == 201, evaluation.text
    deadline = time.monotonic() + 300
    while (body := http.get(f"/v1/evals/{evaluation.json()['id']}").json())["status"] not in (
        "succeeded",
        "failed",
    ):
        assert time.monotonic() < deadline, f"eval still {body['status']}"
        time.sleep(0.5)
    assert body["status"] == "succeeded", body["error"]
    rows = {row["model"]: row for row in body["results"]["table"]}
    base, tuned = rows[BASE_MODEL], rows[exports["adapter"]]
    print(f"\nend-to-end held-out eval: base {base}\n                          fine-tuned {tuned}")
    assert tuned["loss"] < base["loss"] and tuned["exact_match"] > base["exact_match"]
