"""Grader routes: validate and run every grader type, under /v1/graders and OpenAI's alpha path."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fastapi.testclient import TestClient

PREFIXES = ["/v1/graders", "/v1/fine_tuning/alpha/graders"]
STRING_CHECK = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
                "reference": "{{item.answer}}", "operation": "eq"}


def run(client: TestClient, auth: dict, grader: dict, sample: str, item: dict,
        prefix: str = "/v1/graders") -> dict[str, Any]:
    response = client.post(f"{prefix}/run", headers=auth,
                           json={"grader": grader, "model_sample": sample, "item": item})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("prefix", PREFIXES)
def test_validate_fills_defaults_and_names_the_json_path(client: TestClient, auth: dict, prefix: str) -> None:
    ok = client.post(f"{prefix}/validate", headers=auth, json={"grader": {"type": "string_check",
                                                                          "reference": "x"}})
    assert ok.status_code == 200
    assert ok.json()["grader"] == {"type": "string_check", "name": "string_check",
                                   "input": "{{sample.output_text}}", "reference": "x", "operation": "eq"}
    bad = client.post(f"{prefix}/validate", headers=auth, json={"grader": {
        "type": "multi", "calculate_output": "a + b",
        "graders": {"a": STRING_CHECK, "b": {**STRING_CHECK, "reference": "{{itme.answer}}"}}}})
    assert bad.status_code == 422
    error = bad.json()["error"]
    assert error["param"] == "grader.graders.b.reference"
    assert "{{itme.answer}}" in error["message"]
    assert client.post(f"{prefix}/validate", json={"grader": STRING_CHECK}).status_code == 401


@pytest.mark.parametrize("prefix", PREFIXES)
def test_run_string_check(client: TestClient, auth: dict, prefix: str) -> None:
    body = run(client, auth, STRING_CHECK, "42", {"answer": "42"}, prefix)
    assert body["reward"] == 1.0
    assert body["metadata"]["type"] == "string_check" and body["metadata"]["errors"] == []
    assert run(client, auth, STRING_CHECK, "41", {"answer": "42"}, prefix)["reward"] == 0.0


def test_run_text_similarity(client: TestClient, auth: dict) -> None:
    grader = {"type": "text_similarity", "name": "sim", "reference": "{{item.ref}}",
              "evaluation_metric": "rouge_1"}
    # 5 of 6 unigrams shared both ways -> F = 5/6.
    body = run(client, auth, grader, "the cat sat on the mat", {"ref": "the cat sat on a mat"})
    assert body["reward"] == pytest.approx(5 / 6)


def test_run_python_in_the_sandbox(client: TestClient, auth: dict) -> None:
    source = ("def grade(sample, item):\n"
              "    return float(sample['output_json']['n'] == item['n']) * 0.5 + len(item['tags']) / 4\n")
    body = run(client, auth, {"type": "python", "name": "py", "source": source}, '{"n": 3}',
               {"n": 3, "tags": ["a", "b"]})
    assert body["reward"] == 1.0
    assert body["metadata"]["sandbox"].startswith("grader sandbox: ")
    failing = run(client, auth, {"type": "python", "name": "py", "source":
                                 "def grade(sample, item):\n    return 1 / 0\n"}, "x", {})
    assert failing["reward"] == 0.0
    assert "ZeroDivisionError" in failing["metadata"]["errors"][0]


def test_run_code_output(client: TestClient, auth: dict) -> None:
    grader = {"type": "code_output", "name": "trace"}
    item = {"program": "x = [1, 2, 3]\nprint(sum(x), len(x))"}
    assert run(client, auth, grader, "6 3", item)["reward"] == 1.0
    assert run(client, auth, grader, "6 4", item)["reward"] == 0.0


def test_run_multi_reports_sub_rewards(client: TestClient, auth: dict) -> None:
    grader = {"type": "multi", "name": "total", "calculate_output": "0.5 * exact + 0.5 * has_unit",
              "graders": {"exact": {**STRING_CHECK, "reference": "{{item.answer}} km"},
                          "has_unit": {"type": "string_check", "input": "{{sample.output_text}}",
                                       "reference": "KM", "operation": "ilike"}}}
    body = run(client, auth, grader, "12 km", {"answer": "13"})
    assert body["reward"] == 0.5
    assert body["sub_rewards"] == {"exact": 0.0, "has_unit": 1.0}


class _Judge(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        verdict = "8" if "Paris" in body["messages"][-1]["content"] else "2"
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": verdict}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def judge_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_run_score_model(client: TestClient, auth: dict, judge_url: str) -> None:
    grader = {"type": "score_model", "name": "judge", "model": "any", "base_url": judge_url, "range": [0, 10],
              "input": [{"role": "user", "content": "Q: {{item.q}} A: {{sample.output_text}}"}]}
    assert run(client, auth, grader, "Paris", {"q": "capital of France?"})["reward"] == 8.0
    assert run(client, auth, grader, "Lyon", {"q": "capital of France?"})["reward"] == 2.0


def test_run_score_model_with_its_own_judge_down_is_422(client: TestClient, auth: dict) -> None:
    grader = {"type": "score_model", "model": "any", "base_url": "http://127.0.0.1:9/v1", "max_retries": 1,
              "input": [{"role": "user", "content": "{{sample.output_text}}"}]}
    response = client.post("/v1/graders/run", headers=auth, json={"grader": grader, "model_sample": "x"})
    assert response.status_code == 422  # the caller's endpoint is down, not this service
    assert response.json()["error"]["code"] == "judge_unreachable"


def test_run_reward_model_unknown_checkpoint_is_404(client: TestClient, auth: dict) -> None:
    response = client.post("/v1/graders/run", headers=auth, json={
        "grader": {"type": "reward_model", "model": "ckpt_missing"}, "model_sample": "x",
        "item": {"prompt": "hi"}})
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "grader.model"


def test_validate_refuses_a_judge_url_without_a_host(client: TestClient, auth: dict) -> None:
    grader = {"type": "score_model", "model": "any", "base_url": "http://",
              "input": [{"role": "user", "content": "{{sample.output_text}}"}]}
    response = client.post("/v1/graders/validate", headers=auth, json={"grader": grader})
    assert response.status_code == 422 and "base_url" in response.json()["error"]["param"]
