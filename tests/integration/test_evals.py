"""Eval jobs through the API with a REAL Celery worker subprocess consuming the `eval` queue
(embedded filesystem broker + SQLite): base model vs the LoRA fine-tuned on the greeting task,
on that task's held-out split."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.db.migrate import migrate
from app.main import create_app
from app.services.auth import create_api_key
from app.settings import Settings
from app.storage import LocalBlobStore
from tests.api.conftest import upload_jsonl, wait_for_dataset, worker_process_factory  # noqa: F401 - fixture
from tests.inference_support import (
    BASE_MODEL,
    finetuned_exports,
    greeting_records,
    install_base_model,
    jsonl,
    register_finetune,
)

EVAL_TIMEOUT_S = 300


@dataclass
class Env:
    http: TestClient
    headers: dict[str, str]
    other_headers: dict[str, str]
    checkpoints: dict[str, str]
    store: LocalBlobStore
    held_out_id: str


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    worker_process_factory: Callable[..., object],  # noqa: F811 - the fixture imported above
) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("evals")
    settings = Settings(data_dir=root / "data", base_models_dir=root / "models", env="test")
    migrate(settings.database_url)
    install_base_model(settings, tiny_model_dir)
    exports = finetuned_exports(tiny_model_dir, tmp_path_factory.getbasetemp() / "greeter-finetune")
    worker_process_factory(settings, "evals", queues="cpu,eval")
    app = create_app(settings)
    store = app.state.store
    with app.state.sessions() as session:
        team, key = create_api_key(session, "evals-a")
        _, other_key = create_api_key(session, "evals-b")
        checkpoints = register_finetune(session, store, team, exports)
    headers = {"Authorization": f"Bearer {key}"}
    with TestClient(app, raise_server_exceptions=False) as http:
        # Held-out split of the fine-tuning task: same distribution, records never trained on.
        dataset = upload_jsonl(
            http, headers, jsonl(greeting_records(16, seed=1)), format="sft", name="held-out"
        )
        assert wait_for_dataset(http, headers, dataset["id"])["status"] == "ready"
        yield Env(http, headers, {"Authorization": f"Bearer {other_key}"}, checkpoints, store, dataset["id"])
    app.state.sessions.kw["bind"].dispose()


def wait_for_eval(env: Env, eval_id: str) -> dict:
    deadline = time.monotonic() + EVAL_TIMEOUT_S
    while True:
        body = env.http.get(f"/v1/evals/{eval_id}", headers=env.headers).json()
        if body["status"] in ("succeeded", "failed"):
            return body
        assert time.monotonic() < deadline, f"eval {eval_id} still {body['status']} after {EVAL_TIMEOUT_S}s"
        time.sleep(0.5)


def test_finetuned_checkpoint_beats_the_base_model_on_the_held_out_split(env: Env) -> None:
    adapter = env.checkpoints["adapter"]
    created = env.http.post(
        "/v1/evals",
        headers=env.headers,
        json={
            "models": [BASE_MODEL, adapter],
            "dataset_id": env.held_out_id,
            "metrics": ["loss", "perplexity", "exact_match"],
            "generation": {"max_tokens": 8},
            "num_samples": 3,
        },
    )
    assert created.status_code == 201, created.text
    assert created.json()["status"] == "queued"

    body = wait_for_eval(env, created.json()["id"])
    assert body["status"] == "succeeded", body["error"]
    assert body["progress"] == 1.0
    rows = {row["model"]: row for row in body["results"]["table"]}
    base, tuned = rows[BASE_MODEL], rows[adapter]
    print(f"\nheld-out eval: base {base}\n               fine-tuned {tuned}")
    assert tuned["loss"] < base["loss"]
    assert tuned["perplexity"] < base["perplexity"]
    assert tuned["exact_match"] > base["exact_match"]
    per_model = {m["model"]: m for m in body["results"]["models"]}
    assert per_model[adapter]["num_examples"] == 16
    samples = per_model[adapter]["samples"]
    assert len(samples) == 3 and {"prompt", "completion", "answer", "scores"} <= set(samples[0])

    listed = env.http.get("/v1/evals", headers=env.headers).json()
    assert body["id"] in [e["id"] for e in listed["data"]]
    assert env.http.get(f"/v1/evals/{body['id']}", headers=env.other_headers).status_code == 404


def test_a_model_that_cannot_load_fails_the_eval_with_a_clear_error(env: Env) -> None:
    with env.http.app.state.sessions() as session:  # type: ignore[attr-defined]
        from app.db.models import Checkpoint, Team

        checkpoint = session.get(Checkpoint, env.checkpoints["merged"])
        team = session.get(Team, checkpoint.team_id)
        exports = {"merged": env.store.path_for(checkpoint.blob_prefix)}
        broken = register_finetune(session, env.store, team, exports, name="broken")["merged"]
        shutil.rmtree(env.store.path_for(session.get(Checkpoint, broken).blob_prefix))

    created = env.http.post(
        "/v1/evals",
        headers=env.headers,
        json={"models": [broken], "dataset_id": env.held_out_id, "metrics": ["loss"]},
    )
    assert created.status_code == 201, created.text
    body = wait_for_eval(env, created.json()["id"])
    assert body["status"] == "failed"
    assert body["error"]["model"] == broken
    assert body["error"]["message"].startswith(f"model {broken}: ")


def test_bad_eval_requests_are_refused_before_queueing(env: Env) -> None:
    def post(**fields: object) -> dict:
        payload = {"models": [BASE_MODEL], "dataset_id": env.held_out_id, "metrics": ["loss"]} | fields
        response = env.http.post("/v1/evals", headers=env.headers, json=payload)
        return {"status": response.status_code, **response.json()["error"]}

    wrong_format = post(metrics=["preference_accuracy"])
    assert (wrong_format["status"], wrong_format["param"]) == (422, "metrics")
    assert "preference" in wrong_format["message"]
    unknown = post(metrics=["bleu"])
    assert unknown["status"] == 422 and "known metrics" in unknown["message"]
    other_team = env.http.post(
        "/v1/evals",
        headers=env.other_headers,
        json={"models": [env.checkpoints["adapter"]], "dataset_id": env.held_out_id, "metrics": ["loss"]},
    )
    assert other_team.status_code == 404  # the dataset is not theirs either
    missing_model = post(models=[BASE_MODEL, "ckpt_missing"])
    assert (missing_model["status"], missing_model["param"]) == (404, "models[1]")
