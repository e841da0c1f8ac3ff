"""Local inference has limits (issue 13, item 11): the prompt and max_tokens must fit the model's
context; requests on one model take turns token by token; a caller that goes away stops the
generation; SIGTERM ends the server promptly even mid-generation.

The tiny Llama (4,096-token context) is served by the local backend in-process (context, fairness)
and by `tuneyard api` in a subprocess (disconnect, SIGTERM).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.db.migrate import migrate
from app.db.session import make_session_factory
from app.main import create_app
from app.services.auth import create_api_key
from app.settings import Settings
from tests.e2e.service import REPO_ROOT, free_port, service_env, stop, wait_for_http
from tests.inference_support import BASE_MODEL, install_base_model

CONTEXT = 4096  # the tiny model's max_position_embeddings
# Sampling at temperature 1 from the random tiny model rarely hits eos: long generations are long.
LONG = {"model": BASE_MODEL, "prompt": "the city", "n": 4, "max_tokens": 1000, "temperature": 1.0, "seed": 1}
ENDLESS = {**LONG, "n": 16, "max_tokens": 3000}  # minutes of decoding unless it is stopped


@pytest.fixture(scope="module")
def settings_and_key(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Settings, str]:
    root = tmp_path_factory.mktemp("inference-limits")
    settings = Settings(data_dir=root / "data", base_models_dir=root / "models", env="test")
    migrate(settings.database_url)
    install_base_model(settings, tiny_model_dir)
    sessions = make_session_factory(settings)
    with sessions() as session:
        _, key = create_api_key(session, "limits")
    sessions.kw["bind"].dispose()
    return settings, key


@pytest.fixture(scope="module")
def client(settings_and_key: tuple[Settings, str]) -> Iterator[tuple[TestClient, dict[str, str]]]:
    settings, key = settings_and_key
    with TestClient(create_app(settings)) as test_client:
        yield test_client, {"Authorization": f"Bearer {key}"}


def test_prompt_and_max_tokens_must_fit_the_context(client: tuple[TestClient, dict]) -> None:
    api, auth = client
    long_prompt = "the city hello world " * 1500  # several thousand tokens
    response = api.post("/v1/completions", headers=auth,
                        json={"model": BASE_MODEL, "prompt": long_prompt, "max_tokens": 16})
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "context_length_exceeded", response.text
    assert f"context of {CONTEXT} tokens" in error["message"] and "max_tokens (16)" in error["message"]
    response = api.post("/v1/chat/completions", headers=auth, json={
        "model": BASE_MODEL, "max_tokens": CONTEXT, "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 400 and "max_tokens (4096)" in response.json()["error"]["message"]
    started = time.monotonic()
    huge = api.post("/v1/completions", headers=auth, json={"model": BASE_MODEL, "prompt": "x" * 900_000})
    assert huge.status_code == 400 and "900000 characters" in huge.json()["error"]["message"]
    assert time.monotonic() - started < 5  # refused without tokenising a megabyte
    ok = api.post("/v1/completions", headers=auth,
                  json={"model": BASE_MODEL, "prompt": "the", "max_tokens": 4})
    assert ok.status_code == 200, ok.text


def test_a_short_request_does_not_wait_for_a_long_one(client: tuple[TestClient, dict]) -> None:
    api, auth = client
    timings: dict[str, float] = {}

    def long_request() -> None:
        started = time.monotonic()
        assert api.post("/v1/completions", headers=auth, json=LONG).status_code == 200
        timings["long"] = time.monotonic() - started

    worker = threading.Thread(target=long_request)
    worker.start()
    time.sleep(1.0)  # the long request holds the model now
    started = time.monotonic()
    short = api.post("/v1/completions", headers=auth,
                     json={"model": BASE_MODEL, "prompt": "the", "max_tokens": 2, "temperature": 0})
    timings["short"] = time.monotonic() - started
    worker.join()
    assert short.status_code == 200
    assert timings["short"] < timings["long"] / 4, timings


@pytest.fixture(scope="module")
def server(settings_and_key: tuple[Settings, str],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    settings, key = settings_and_key
    port = free_port()
    log = tmp_path_factory.mktemp("limits-api") / "api.log"
    env = service_env(settings.data_dir, TUNEYARD_BASE_MODELS_DIR=str(settings.base_models_dir))
    process = subprocess.Popen([sys.executable, "-m", "tuneyard_cli", "api", "--port", str(port)],
                               cwd=REPO_ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", process, log)
        warm = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=300,  # loads the model
                          headers={"Authorization": f"Bearer {key}"},
                          json={"model": BASE_MODEL, "prompt": "the", "max_tokens": 1})
        assert warm.status_code == 200, warm.text
        yield process, port, key, log
    finally:
        stop(process)


def _send_long(port: int, key: str) -> socket.socket:
    import json

    body = json.dumps(ENDLESS).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                 + b"\r\n\r\n" + body)
    return sock


def _wait_for_line(log: Path, text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text():
            return True
        time.sleep(0.2)
    return False


def test_a_caller_that_goes_away_stops_its_generation(server: tuple) -> None:
    _, port, key, log = server
    sock = _send_long(port, key)
    time.sleep(3.0)  # the model is loaded and decoding
    sock.close()
    assert _wait_for_line(log, "generation stopped after", 30), log.read_text()[-2000:]


def test_sigterm_ends_the_server_during_a_generation(server: tuple) -> None:
    process, port, key, _ = server
    sock = _send_long(port, key)
    time.sleep(2.0)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    sock.close()
    assert time.monotonic() - started < 20
