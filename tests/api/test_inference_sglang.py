"""With the SGLang backend and no SGLang server, inference answers 503 in the error shape, at once."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.db.migrate import migrate
from app.main import create_app
from app.services.auth import create_api_key
from app.settings import Settings


@pytest.fixture(scope="module")
def app_without_sglang(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[TestClient, dict[str, str]]]:
    root = tmp_path_factory.mktemp("sglang-down")
    (root / "models" / "tiny-llama").mkdir(parents=True)
    (root / "models" / "tiny-llama" / "config.json").write_text('{"model_type": "llama"}')
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = Settings(
        data_dir=root / "data",
        base_models_dir=root / "models",
        env="test",
        inference_backend="sglang",
        sglang_url=f"http://127.0.0.1:{port}",
    )
    migrate(settings.database_url)
    app = create_app(settings)
    with app.state.sessions() as session:
        _, key = create_api_key(session, "sglang-down")
    with TestClient(app, raise_server_exceptions=False) as http:
        yield http, {"Authorization": f"Bearer {key}"}
    app.state.sessions.kw["bind"].dispose()


@pytest.mark.parametrize("stream", [False, True])
def test_sglang_down_is_a_quick_503(
    app_without_sglang: tuple[TestClient, dict[str, str]], stream: bool
) -> None:
    http, headers = app_without_sglang
    started = time.monotonic()
    response = http.post(
        "/v1/chat/completions",
        headers=headers,
        json={"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "stream": stream},
    )
    assert time.monotonic() - started < 5
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["type"] == "service_unavailable_error" and error["code"] == "inference_unavailable"
    assert "SGLang server" in error["message"] and "not reachable" in error["message"]


def test_unknown_models_are_404_before_sglang_is_asked(
    app_without_sglang: tuple[TestClient, dict[str, str]],
) -> None:
    http, headers = app_without_sglang
    response = http.post("/v1/completions", headers=headers, json={"model": "nope", "prompt": "x"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_models_are_listed_without_the_inference_server(
    app_without_sglang: tuple[TestClient, dict[str, str]],
) -> None:
    http, headers = app_without_sglang
    assert [m["id"] for m in http.get("/v1/models", headers=headers).json()["data"]] == ["tiny-llama"]
