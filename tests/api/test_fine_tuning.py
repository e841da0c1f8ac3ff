"""OpenAI's files, fine-tuning jobs and webhook endpoints over HTTP (validation by the real worker;
training itself is in tests/integration/test_openai_fine_tuning.py)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI

from app.db.models import WebhookDelivery, WebhookDeliveryAttempt, WebhookEndpoint
from app.services import outbox
from tests.api.conftest import Backend
from worker.webhooks import deliver_due, retry_delay

CHAT = [{"messages": [{"role": "user", "content": f"{i}+{i}?"}, {"role": "assistant", "content": f"{2 * i}"}]}
        for i in range(10)]
PREFS = [{"input": {"messages": [{"role": "user", "content": f"Name {i}."}]},
          "preferred_output": [{"role": "assistant", "content": f"{i}"}],
          "non_preferred_output": [{"role": "assistant", "content": "no"}]} for i in range(6)]


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def upload_file(client: TestClient, auth: dict, data: bytes, purpose: str = "fine-tune") -> dict:
    response = client.post("/v1/files", headers=auth, files={"file": ("train.jsonl", data)},
                           data={"purpose": purpose})
    assert response.status_code == 200, response.text
    return response.json()


def wait_file(client: TestClient, auth: dict, file_id: str) -> dict:
    deadline = time.monotonic() + 60
    while (body := client.get(f"/v1/files/{file_id}", headers=auth).json())["status"] == "uploaded":
        assert time.monotonic() < deadline, f"file {file_id} still validating"
        time.sleep(0.25)
    return body


def wait_job(client: TestClient, auth: dict, job_id: str) -> dict:
    deadline = time.monotonic() + 60
    while (job := client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json())["status"] == \
            "validating_files":
        assert time.monotonic() < deadline, f"job {job_id} still validating its files"
        time.sleep(0.25)
    return job


def test_files_are_datasets(client: TestClient, auth: dict, other_auth: dict) -> None:
    data = jsonl(CHAT)
    created = upload_file(client, auth, data)
    assert created["object"] == "file" and created["purpose"] == "fine-tune" and created["bytes"] == len(data)
    assert created["filename"] == "train.jsonl" and created["status"] in ("uploaded", "processed")
    assert wait_file(client, auth, created["id"])["status"] == "processed"
    assert client.get(f"/v1/datasets/{created['id']}", headers=auth).json()["format"] == "sft"
    assert client.get(f"/v1/files/{created['id']}/content", headers=auth).content == data
    listed = client.get("/v1/files", params={"purpose": "fine-tune"}, headers=auth).json()
    assert listed["object"] == "list" and created["id"] in [f["id"] for f in listed["data"]]
    assert client.get("/v1/files", params={"purpose": "batch"}, headers=auth).json()["data"] == []
    assert client.get(f"/v1/files/{created['id']}", headers=other_auth).status_code == 404
    deleted = client.delete(f"/v1/files/{created['id']}", headers=auth).json()
    assert deleted == {"id": created["id"], "object": "file", "deleted": True}
    assert client.get(f"/v1/files/{created['id']}", headers=auth).status_code == 404


def test_file_purpose_and_line_numbered_errors(client: TestClient, auth: dict) -> None:
    response = client.post("/v1/files", headers=auth, files={"file": ("b.jsonl", jsonl(CHAT))},
                           data={"purpose": "batch"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "purpose"
    broken = jsonl(CHAT[:2]) + b'{"messages": [{"role": "user", "content": 3}]}\n'
    details = wait_file(client, auth, upload_file(client, auth, broken)["id"])
    assert details["status"] == "error" and "line 3" in details["status_details"]


def test_job_waits_for_its_file_then_is_a_run(client: TestClient, auth: dict) -> None:
    file_id = upload_file(client, auth, jsonl(CHAT))["id"]
    body = {"model": "tiny-llama", "training_file": file_id, "suffix": "adder", "seed": 7,
            "metadata": {"team": "math"},
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}}}
    created = client.post("/v1/fine_tuning/jobs", json=body, headers=auth)
    assert created.status_code == 200, created.text
    job = wait_job(client, auth, created.json()["id"])
    assert job["object"] == "fine_tuning.job" and job["status"] == "queued" and job["seed"] == 7
    assert job["fine_tuned_model"] is None and job["run_id"]
    # "auto" resolved from the 10 records: batch 1 (10/64 rounds to 1), rate multiplier 1.
    assert job["hyperparameters"] == {"batch_size": 1, "learning_rate_multiplier": 1.0, "n_epochs": 2}
    assert job["method"]["supervised"]["hyperparameters"]["batch_size"] == 1
    run = client.get(f"/v1/runs/{job['run_id']}", headers=auth).json()
    assert run["name"] == job["id"] and run["status"] == "queued"
    assert [(s["method"], s["status"]) for s in run["stages"]] == [("sft", "pending")]
    assert run["spec"]["stages"][0]["epochs"] == 2 and run["spec"]["seed"] == 7
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=auth).json()["data"]
    assert events[-1]["message"].startswith("Created fine-tuning job") and events[0]["object"] == \
        "fine_tuning.job.event"
    assert "run created and queued" in [e["message"] for e in events]
    matching = client.get("/v1/fine_tuning/jobs", params={"metadata[team]": "math"}, headers=auth).json()
    assert [j["id"] for j in matching["data"]] == [job["id"]]
    other = client.get("/v1/fine_tuning/jobs", params={"metadata[team]": "art"}, headers=auth).json()
    assert other["data"] == []


def test_bad_files_fail_the_job_with_openai_codes(client: TestClient, auth: dict) -> None:
    broken = jsonl(CHAT[:3]) + b"not json\n"
    bad_id = upload_file(client, auth, broken)["id"]
    job = wait_job(client, auth, client.post("/v1/fine_tuning/jobs", headers=auth, json={
        "model": "tiny-llama", "training_file": bad_id}).json()["id"])
    assert job["status"] == "failed" and job["run_id"] is None
    assert job["error"]["code"] == "invalid_training_file" and job["error"]["param"] == "training_file"
    assert "line 4" in job["error"]["message"]
    chat_id = upload_file(client, auth, jsonl(CHAT))["id"]
    job = wait_job(client, auth, client.post("/v1/fine_tuning/jobs", headers=auth, json={
        "model": "tiny-llama", "training_file": chat_id, "method": {"type": "dpo"}}).json()["id"])
    assert job["status"] == "failed" and "preference records" in job["error"]["message"]
    missing = client.post("/v1/fine_tuning/jobs", headers=auth, json={"model": "tiny-llama",
                                                                       "training_file": "ds_nothing"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "training_file"
    unknown = client.post("/v1/fine_tuning/jobs", headers=auth,
                          json={"model": "gpt-9", "training_file": chat_id})
    assert unknown.json()["error"]["code"] == "model_not_found"
    both = client.post("/v1/fine_tuning/jobs", headers=auth, json={
        "model": "tiny-llama", "training_file": chat_id, "hyperparameters": {"n_epochs": 1},
        "method": {"type": "supervised"}})
    assert both.status_code == 422


def test_deprecated_hyperparameters_and_dpo_beta(client: TestClient, auth: dict) -> None:
    chat_id = upload_file(client, auth, jsonl(CHAT))["id"]
    job = wait_job(client, auth, client.post("/v1/fine_tuning/jobs", headers=auth, json={
        "model": "tiny-llama", "training_file": chat_id,
        "hyperparameters": {"batch_size": 2, "learning_rate_multiplier": 0.5, "n_epochs": 1}}).json()["id"])
    assert job["method"]["type"] == "supervised"
    run = client.get(f"/v1/runs/{job['run_id']}", headers=auth).json()
    assert run["spec"]["stages"][0]["batch_size"] == 2 and run["spec"]["stages"][0]["learning_rate"] == 1e-4
    pref_id = upload_file(client, auth, jsonl(PREFS))["id"]
    job = wait_job(client, auth, client.post("/v1/fine_tuning/jobs", headers=auth, json={
        "model": "tiny-llama", "training_file": pref_id,
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.3, "n_epochs": 1}}}}).json()["id"])
    run = client.get(f"/v1/runs/{job['run_id']}", headers=auth).json()
    assert run["spec"]["stages"][0]["method"] == "dpo" and run["spec"]["stages"][0]["beta"] == 0.3


def test_cancel_pause_resume_of_a_queued_job_and_its_webhook(client: TestClient, auth: dict,
                                                             backend: Backend) -> None:
    endpoint = client.post("/v1/webhook_endpoints", headers=auth, json={
        "url": "http://127.0.0.1:9/hook", "name": "ci", "event_types": ["fine_tuning.job.cancelled"]}).json()
    chat_id = upload_file(client, auth, jsonl(CHAT))["id"]
    job = wait_job(client, auth, client.post("/v1/fine_tuning/jobs", headers=auth, json={
        "model": "tiny-llama", "training_file": chat_id}).json()["id"])
    paused = client.post(f"/v1/fine_tuning/jobs/{job['id']}/pause", headers=auth).json()
    assert paused["status"] == "paused"
    assert client.get(f"/v1/runs/{job['run_id']}", headers=auth).json()["status"] == "cancelled"
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/pause", headers=auth).status_code == 409
    resumed = client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume", headers=auth).json()
    assert resumed["status"] == "queued"
    # The pause stopped the run as a cancel would, but no job event went out for it.
    with backend.app.state.sessions() as session:
        assert session.query(WebhookDelivery).filter_by(endpoint_id=endpoint["id"]).count() == 0
    cancelled = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=auth).json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=auth).status_code == 409
    deliveries = client.get(f"/v1/webhook_endpoints/{endpoint['id']}/deliveries", headers=auth).json()["data"]
    assert [(d["event_type"], d["status"]) for d in deliveries] == [("fine_tuning.job.cancelled", "pending")]


def test_webhook_endpoints(client: TestClient, auth: dict, other_auth: dict) -> None:
    body = {"url": "https://example.test/hook", "name": "prod", "event_types": ["fine_tuning.job.succeeded"]}
    created = client.post("/v1/webhook_endpoints", headers=auth, json=body).json()
    assert created["object"] == "webhook_endpoint" and created["signing_secret"].startswith("whsec_")
    assert created["signing_secret_hint"].endswith(created["signing_secret"][-4:])
    got = client.get(f"/v1/webhook_endpoints/{created['id']}", headers=auth).json()
    assert "signing_secret" not in got and got["event_types"] == ["fine_tuning.job.succeeded"]
    assert client.get(f"/v1/webhook_endpoints/{created['id']}", headers=other_auth).status_code == 404
    updated = client.post(f"/v1/webhook_endpoints/{created['id']}", headers=auth,
                          json={"event_types": ["run.failed", "eval.succeeded"]}).json()
    assert updated["event_types"] == ["run.failed", "eval.succeeded"]
    rotated = client.post(f"/v1/webhook_endpoints/{created['id']}/rotate_secret", headers=auth,
                          json={}).json()
    assert rotated["signing_secret"] != created["signing_secret"]
    bad = client.post("/v1/webhook_endpoints", headers=auth,
                      json={**body, "event_types": ["batch.completed"]})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "event_types"
    listed = client.get("/v1/webhook_endpoints", headers=auth).json()["data"]
    assert [e["id"] for e in listed] == [created["id"]]
    types = client.get("/v1/webhook_event_types", headers=auth).json()["data"]
    assert types[0] == "fine_tuning.job.succeeded"
    deleted = client.delete(f"/v1/webhook_endpoints/{created['id']}", headers=auth).json()
    assert deleted == {"id": created["id"], "object": "webhook_endpoint.deleted", "deleted": True}


def test_reinforcement_grader_is_checked_at_create(client: TestClient, auth: dict) -> None:
    prompts = [{"messages": [{"role": "user", "content": f"Say {c}."}], "answer": c} for c in "abcd"]
    file_id = upload_file(client, auth, jsonl(prompts))["id"]
    grader = {"type": "string_check", "name": "g", "input": "{{sample.output_text}}", "operation": "eq"}
    response = client.post("/v1/fine_tuning/jobs", headers=auth, json={
        "model": "tiny-llama", "training_file": file_id,
        "method": {"type": "reinforcement", "reinforcement": {"grader": grader}}})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "method.reinforcement.grader.reference"
    grader["reference"] = "{{item.answer}}"
    job = wait_job(client, auth, client.post("/v1/fine_tuning/jobs", headers=auth, json={
        "model": "tiny-llama", "training_file": file_id,
        "method": {"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": {
            "batch_size": 2, "eval_samples": 3}}}}).json()["id"])
    assert job["status"] == "queued"
    assert job["method"]["reinforcement"]["grader"]["reference"] == "{{item.answer}}"
    stage = client.get(f"/v1/runs/{job['run_id']}", headers=auth).json()["spec"]["stages"][0]
    assert (stage["method"], stage["reward"]["type"], stage["batch_size"]) == ("grpo", "string_check", 8)


@pytest.mark.parametrize("field, value", [("suffix", "x" * 65), ("seed", -1), ("metadata", {"k": "v" * 513})])
def test_job_request_limits(client: TestClient, auth: dict, field: str, value: object) -> None:
    response = client.post("/v1/fine_tuning/jobs", headers=auth,
                           json={"model": "tiny-llama", "training_file": "ds_x", field: value})
    assert response.status_code == 422 and response.json()["error"]["param"].startswith(field)


class _Receiver:
    """A local HTTP receiver answering `code`, verifying every request with the openai SDK."""

    def __init__(self, code: int) -> None:
        self.code, self.secrets, self.seen = code, [], []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                verified = [OpenAI(api_key="x").webhooks.unwrap(body, headers, secret=s).type
                            for s in receiver.secrets]
                receiver.seen.append((headers["webhook-id"], verified))
                self.send_response(receiver.code)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_endpoint_test_signs_with_current_and_kept_secrets(client: TestClient, auth: dict) -> None:
    receiver = _Receiver(204)
    created = client.post("/v1/webhook_endpoints", headers=auth, json={
        "url": receiver.url, "name": "t", "event_types": ["fine_tuning.job.failed"]}).json()
    rotated = client.post(f"/v1/webhook_endpoints/{created['id']}/rotate_secret", headers=auth,
                          json={"keep_old_secret_active_for_24_hours": True}).json()
    receiver.secrets = [created["signing_secret"], rotated["signing_secret"]]
    result = client.post(f"/v1/webhook_endpoints/{created['id']}/test", headers=auth,
                         json={"event_type": "fine_tuning.job.failed"}).json()
    assert result == {"object": "webhook_endpoint.test", "event_type": "fine_tuning.job.failed",
                      "status_code": 204, "success": True, "webhook_endpoint_id": created["id"]}
    (_, verified), = receiver.seen
    assert verified == ["fine_tuning.job.failed", "fine_tuning.job.failed"]  # both secrets verify
    receiver.server.shutdown()


def test_deliveries_back_off_and_give_up(client: TestClient, auth: dict, backend: Backend) -> None:
    receiver = _Receiver(503)
    endpoint = client.post("/v1/webhook_endpoints", headers=auth, json={
        "url": receiver.url, "name": "down", "event_types": ["run.failed"]}).json()
    receiver.secrets = [endpoint["signing_secret"]]
    settings = backend.settings.model_copy(update={
        "webhook_retry_base_seconds": 0.2, "webhook_max_attempts": 3, "webhook_timeout_seconds": 2})
    sessions = backend.app.state.sessions
    with sessions() as session:
        team_id = session.get(WebhookEndpoint, endpoint["id"]).team_id
        event = outbox.emit(session, team_id, "run.failed", {"id": "run_x", "status": "failed"})
        session.commit()

    def attempts() -> int:
        with sessions() as session:
            return session.query(WebhookDelivery).filter_by(event_id=event.id).one().attempts

    # Other tests' deliveries share the database, so attempts are counted on this event's row.
    with httpx.Client(timeout=2) as http:
        deadline = time.monotonic() + 30
        while attempts() < 3 and time.monotonic() < deadline:
            deliver_due(sessions, http, settings)
            time.sleep(0.02)
        time.sleep(1.0)
        deliver_due(sessions, http, settings)
    assert attempts() == 3  # failed for good: never taken again
    with sessions() as session:
        rows = session.query(WebhookDeliveryAttempt).join(
            WebhookDelivery, WebhookDelivery.id == WebhookDeliveryAttempt.delivery_id).filter(
            WebhookDelivery.event_id == event.id).order_by(WebhookDeliveryAttempt.number).all()
    ends = [(r.started_at.timestamp(), r.started_at.timestamp() + r.duration_ms / 1000) for r in rows]
    gaps = [start - end for (_, end), (start, _) in zip(ends, ends[1:], strict=False)]
    # The next attempt is never taken before it is due: 0.2 s after the first, 0.4 s after the
    # second (each ±10 %), counted from when the receiver's answer came back.
    assert len(gaps) == 2 and gaps[0] >= 0.17 and gaps[1] >= 0.35, gaps
    assert [retry_delay(n, settings, jitter=0) for n in (1, 2, 3)] == [0.2, 0.4, 0.8]
    capped = settings.model_copy(update={"webhook_retry_max_seconds": 0.5})
    assert retry_delay(3, capped, jitter=0) == 0.5
    assert [i for i, _ in receiver.seen] == [event.id] * 3  # one webhook-id on every retry
    listed = client.get(f"/v1/webhook_endpoints/{endpoint['id']}/deliveries", headers=auth).json()
    (delivery,) = listed["data"]
    assert delivery["status"] == "failed" and [a["status_code"] for a in delivery["attempts"]] == [503] * 3
    assert delivery["next_attempt_at"] is None
    receiver.server.shutdown()
