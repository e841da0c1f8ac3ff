"""Hostile or unlucky input at the API's edge gets a clean 4xx, on SQLite and on PostgreSQL.

Each test is a reproduction from the hardening attack run (issue 13): NUL bytes in ids, cursors
and bodies; non-finite and out-of-range numbers in run specs; a multipart body cut before its
closing boundary; temporary files of a killed upload; oversized specs; log injection; degenerate
preference pairs.
"""

from __future__ import annotations

import io
import logging
import os
import time

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.observability import make_log_handler
from tests.api.conftest import Backend, upload_jsonl, wait_for_dataset

SFT = b'{"prompt": "2+2=", "completion": "4"}\n' * 4


NO_DATASET = "ds_00000000000000000000000000"


def _spec(dataset_id: str = NO_DATASET) -> dict:
    return {"base_model": "tiny-llama", "stages": [{"method": "sft", "datasets": [{"id": dataset_id}]}]}


def _tmp_entries(backend: Backend) -> list[str]:
    return sorted(os.listdir(backend.settings.storage_dir / ".tmp"))


# ---------------------------------------------------------------- 1. NUL bytes


@pytest.mark.parametrize("url", [
    "/v1/checkpoints/ckpt_%00", "/v1/checkpoints/ckpt_%00/archive", "/v1/checkpoints/ckpt_%00/files/a",
    "/v1/evals/eval_%00", "/v1/datasets/ds_%00", "/v1/runs/run_%00", "/v1/evals?after=a%00",
    "/v1/runs/run_00000000000000000000000000/checkpoints?after=a%00", "/v1/datasets?after=a%00",
    "/v1/runs/run_00000000000000000000000000/metrics?split=tr%00", "/v1/runs?after=run_1%0a",
])
def test_nul_and_control_characters_in_urls_are_400(client: TestClient, auth: dict, url: str) -> None:
    response = client.get(url, headers=auth)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "control_character"


def test_cursors_share_one_pattern_on_every_list(client: TestClient, auth: dict) -> None:
    for url in ("/v1/evals", "/v1/runs", "/v1/datasets", f"/v1/runs/run_{'0' * 26}/checkpoints"):
        response = client.get(url, params={"after": "x'; --"}, headers=auth)
        assert response.status_code == 422, (url, response.text)
        assert response.json()["error"]["param"] == "after"


def test_nul_in_json_ids_is_422_naming_the_field(client: TestClient, auth: dict) -> None:
    chat = client.post("/v1/chat/completions", headers=auth,
                       json={"model": "ck\u0000pt", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 422 and chat.json()["error"]["param"] == "model", chat.text
    evals = client.post("/v1/evals", headers=auth, json={"models": ["tiny-llama", "ckpt_\u0000"],
                                                         "dataset_id": "ds_1", "metrics": ["loss"]})
    error = evals.json()["error"]
    assert evals.status_code == 422 and error["param"] == "models" and "[1]" in error["message"], evals.text
    run = client.post("/v1/runs", headers=auth, json=_spec("ds_\u0000"))
    assert run.status_code == 422 and run.json()["error"]["param"] == "stages[0].datasets[0].id", run.text


def test_well_formed_but_unknown_ids_in_bodies_are_404_not_500(client: TestClient, auth: dict) -> None:
    chat = client.post("/v1/chat/completions", headers=auth,
                       json={"model": "ckpt_" + "z" * 300, "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 404, chat.text
    evals = client.post("/v1/evals", headers=auth,
                        json={"models": ["tiny-llama"], "dataset_id": "ds_" + "z" * 60, "metrics": ["loss"]})
    assert evals.status_code == 404, evals.text


# ---------------------------------------------------- 2. non-finite floats, 3. out-of-range numbers


@pytest.mark.parametrize(("raw_stage", "param"), [
    ('"epochs": Infinity', "stages[0].epochs"),
    ('"weight_decay": NaN', "stages[0].weight_decay"),
    ('"max_grad_norm": 1e999', "stages[0].max_grad_norm"),
    ('"max_steps": 1000000000000', "stages[0].max_steps"),
    ('"gradient_accumulation": 1000000000', "stages[0].gradient_accumulation"),
    ('"batch_size": 1000000000', "stages[0].batch_size"),
    ('"epochs": 1e300', "stages[0].epochs"),
])
def test_sft_numbers_out_of_range_are_422(client: TestClient, auth: dict, raw_stage: str, param: str) -> None:
    body = ('{"base_model": "tiny-llama", "stages": [{"method": "sft", '
            f'"datasets": [{{"id": "{NO_DATASET}"}}], {raw_stage}}}]}}')
    response = client.post("/v1/runs", content=body, headers={**auth, "Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize(("overrides", "param"), [
    ('"seed": -1000000000000000000000000000000', "seed"),
    ('"adapter": {"type": "lora", "alpha": Infinity}', "adapter.alpha"),
    ('"stages": [{"method": "dpo", "datasets": [{"id": "ds_1"}], "beta": Infinity}]', "stages[0].beta"),
    ('"stages": [{"method": "sft", "datasets": [{"id": "ds_1", "weight": Infinity}]}]',
     "stages[0].datasets[0].weight"),
    ('"stages": [{"method": "grpo", "datasets": [{"id": "ds_1"}], "temperature": Infinity}]',
     "stages[0].temperature"),
    ('"stages": [{"method": "grpo", "datasets": [{"id": "ds_1"}], "batch_size": 1000000000, '
     '"num_generations": 1000000000}]', "stages[0].batch_size"),
    ('"stages": [{"method": "grpo", "datasets": [{"id": "ds_1"}], '
     '"reward": {"type": "regex", "pattern": "a", "weight": -Infinity}}]', "stages[0].reward.weight"),
])
def test_spec_numbers_out_of_range_are_422(client: TestClient, auth: dict, overrides: str,
                                           param: str) -> None:
    body = '{"base_model": "tiny-llama", ' + overrides
    if '"stages"' not in overrides:
        body += ', "stages": [{"method": "sft", "datasets": [{"id": "ds_1"}]}]'
    response = client.post("/v1/runs", content=body + "}",
                           headers={**auth, "Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param


def test_eval_and_inference_numbers_are_bounded(client: TestClient, auth: dict) -> None:
    evals = client.post("/v1/evals", headers={**auth, "Content-Type": "application/json"},
                        content='{"models": ["tiny-llama"], "dataset_id": "ds_1", "metrics": ["loss"], '
                                '"generation": {"temperature": NaN, "seed": 100000000000000000000000}}')
    assert evals.status_code == 422 and evals.json()["error"]["param"].startswith("generation."), evals.text
    chat = client.post("/v1/chat/completions", headers={**auth, "Content-Type": "application/json"},
                       content='{"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], '
                               '"seed": -100000000000000000000000}')
    assert chat.status_code == 422 and chat.json()["error"]["param"] == "seed", chat.text


# ---------------------------------------------------------------- 9. truncated multipart


def test_multipart_without_closing_boundary_is_400_and_leaves_nothing(
        client: TestClient, auth: dict, backend: Backend) -> None:
    before = client.get("/v1/datasets", params={"limit": 100}, headers=auth).json()["data"]
    body = (b'--XYZ\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n'
            b'Content-Type: application/jsonl\r\n\r\n' + SFT + b'{"prompt": "cut')
    response = client.post("/v1/datasets", content=body,
                           headers={**auth, "Content-Type": "multipart/form-data; boundary=XYZ"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "truncated_multipart"
    after = client.get("/v1/datasets", params={"limit": 100}, headers=auth).json()["data"]
    assert after == before and _tmp_entries(backend) == []
    complete = body + b'"}\r\n--XYZ--\r\n'
    ok = client.post("/v1/datasets", content=complete,
                     headers={**auth, "Content-Type": "multipart/form-data; boundary=XYZ"})
    assert ok.status_code == 201, ok.text


# ---------------------------------------------------------------- 10. temporary files of killed uploads


def test_stale_temporary_files_are_swept_at_start_up(backend: Backend) -> None:
    settings = backend.settings.model_copy(update={"tmp_max_age_seconds": 3600})
    tmp = settings.storage_dir / ".tmp"
    stale, fresh = tmp / "part_killed_upload", tmp / "part_upload_in_progress"
    stale.write_bytes(b"x" * 1024)
    fresh.write_bytes(b"y")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    app = create_app(settings)
    try:
        with TestClient(app):
            deadline = time.monotonic() + 10
            while stale.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        assert not stale.exists() and fresh.exists()
    finally:
        fresh.unlink(missing_ok=True)
        app.state.sessions.kw["bind"].dispose()


# ---------------------------------------------------------------- 12. huge specs


def test_huge_spec_is_refused_before_parsing(client: TestClient, auth: dict) -> None:
    refs = ",".join(['{"id": "ds_00000000000000000000000000"}'] * 300_000)  # ~12 MB, as in the attack
    body = '{"base_model": "tiny-llama", "stages": [{"method": "sft", "datasets": [' + refs + "]}]}"
    started = time.perf_counter()
    response = client.post("/v1/runs", content=body, headers={**auth, "Content-Type": "application/json"})
    assert response.status_code == 413, response.text
    assert time.perf_counter() - started < 5


def test_long_lists_within_the_body_limit_are_422(client: TestClient, auth: dict) -> None:
    refs = [{"id": "ds_00000000000000000000000000"}] * 20_000  # under 1 MiB
    response = client.post("/v1/runs", json=_spec() | {"stages": [{"method": "sft", "datasets": refs}]},
                           headers=auth)
    assert response.status_code == 422 and response.json()["error"]["param"] == "stages[0].datasets"


# ---------------------------------------------------------------- 13. log injection


@pytest.mark.parametrize("json_lines", [False, True])
def test_control_characters_never_split_a_log_line(client: TestClient, auth: dict, json_lines: bool) -> None:
    out = io.StringIO()
    handler = make_log_handler(json_lines, out)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        client.get("/v1/x%0aFORGED%20admin%20login%0d%1b[31m", headers=auth)
        logging.getLogger("tuneyard.test").warning("name %s", "a\nFORGED line")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    lines = out.getvalue().splitlines()
    assert lines and not any(line.startswith("FORGED") for line in lines), lines
    assert any("FORGED admin login" in line for line in lines)
    assert "\x1b" not in out.getvalue()


# ---------------------------------------------------------------- 16. degenerate preference pairs


def test_equal_preference_answers_are_warned_with_line_numbers(client: TestClient, auth: dict) -> None:
    data = (b'{"prompt": "2+2=", "chosen": "4", "rejected": "5"}\n'
            b'{"prompt": "3+3=", "chosen": "6", "rejected": "6"}\n'
            b'\n'
            b'{"input": {"messages": [{"role": "user", "content": "hi"}]}, '
            b'"preferred_output": [{"role": "assistant", "content": "hello"}], '
            b'"non_preferred_output": [{"role": "assistant", "content": "hello"}]}\n')
    dataset = wait_for_dataset(client, auth, upload_jsonl(client, auth, data, format="preference")["id"])
    assert dataset["status"] == "ready", dataset
    assert dataset["stats"]["num_warnings"] == 2
    assert [(w["line"], w["field"]) for w in dataset["stats"]["warnings"]] == [
        (2, "chosen"), (4, "preferred_output")]
    assert "no preference signal" in dataset["stats"]["warnings"][0]["message"]


# ---------------------------------------------------------------- 4. user errors caught at submit


def test_what_the_base_model_cannot_train_is_refused_at_submit(
        client: TestClient, auth: dict, backend: Backend) -> None:
    config_only = backend.settings.base_models_dir / "config-only"
    if not config_only.exists():
        config_only.mkdir()
        (config_only / "config.json").write_text('{"model_type": "llama"}')
    dataset = wait_for_dataset(client, auth, upload_jsonl(client, auth, SFT)["id"])
    spec = _spec(dataset["id"])
    response = client.post("/v1/runs", json=spec | {"base_model": "config-only"}, headers=auth)
    error = response.json()["error"]
    assert response.status_code == 422 and error["code"] == "model_unloadable", response.text
    assert error["param"] == "base_model" and "no weights" in error["message"]
    for targets, index in ((["q_proj", "nope_proj"], 1), (["norm"], 0)):
        adapter = {"type": "lora", "target_modules": targets}
        response = client.post("/v1/runs", json=spec | {"adapter": adapter}, headers=auth)
        error = response.json()["error"]
        assert response.status_code == 422, response.text
        assert error["param"] == f"adapter.target_modules[{index}]"
        assert "q_proj" in error["message"]  # names what the model does have
    ok = client.post("/v1/runs", json=spec | {"adapter": {"type": "lora", "target_modules": ["q_proj"]}},
                     headers=auth)
    assert ok.status_code == 201, ok.text
