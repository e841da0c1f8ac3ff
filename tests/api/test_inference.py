"""OpenAI-compatible inference on the local backend, driven by the `openai` package against a real
uvicorn server (and in-process for concurrency and cache-bound checks), with a LoRA checkpoint
fine-tuned by the real pipeline and registered as a finished run's exports."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from app.db.migrate import migrate
from app.db.session import make_session_factory
from app.inference.registry import app_backend, close_backend
from app.main import create_app
from app.services.auth import create_api_key
from app.settings import Settings
from app.storage import LocalBlobStore
from tests.e2e.service import REPO_ROOT, free_port, service_env, stop, wait_for_http
from tests.inference_support import (
    ANSWERS,
    BASE_MODEL,
    RUN_NAME,
    TRAIN_STEPS,
    finetuned_exports,
    install_base_model,
    register_finetune,
)

HELLO = [{"role": "user", "content": "what is the city hello"}]


@dataclass
class Env:
    settings: Settings
    key: str
    other_key: str
    checkpoints: dict[str, str]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Env:
    root = tmp_path_factory.mktemp("inference")
    settings = Settings(data_dir=root / "data", base_models_dir=root / "models", env="test")
    migrate(settings.database_url)
    install_base_model(settings, tiny_model_dir)
    exports = finetuned_exports(tiny_model_dir, tmp_path_factory.getbasetemp() / "greeter-finetune")
    sessions = make_session_factory(settings)
    with sessions() as session:
        team, key = create_api_key(session, "inference-a")
        _, other_key = create_api_key(session, "inference-b")
        checkpoints = register_finetune(session, LocalBlobStore(settings.storage_dir), team, exports)
    sessions.kw["bind"].dispose()
    return Env(settings, key, other_key, checkpoints)


@pytest.fixture(scope="module")
def server(env: Env, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Returns the base URL of a uvicorn subprocess serving the app on the env's data folder."""
    port = free_port()
    log = tmp_path_factory.mktemp("inference-api") / "api.log"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:build_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=REPO_ROOT,
        env=service_env(env.settings.data_dir, TUNEYARD_BASE_MODELS_DIR=str(env.settings.base_models_dir)),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base_url}/healthz", process, log)
        yield base_url
    finally:
        stop(process)


def client(server: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0, timeout=120)


def test_openai_client_lists_models_and_chats_with_the_finetuned_adapter(server: str, env: Env) -> None:
    api = client(server, env.key)
    models = {m.id: m for m in api.models.list().data}
    assert BASE_MODEL in models
    assert {env.checkpoints["adapter"], env.checkpoints["merged"]} <= set(models)

    chat = api.chat.completions.create(
        model=env.checkpoints["adapter"], messages=HELLO, max_tokens=8, temperature=0
    )
    assert chat.model == env.checkpoints["adapter"]
    assert chat.choices[0].message.content == ANSWERS["hello"]
    assert chat.choices[0].finish_reason == "stop"
    assert chat.usage is not None and chat.usage.completion_tokens > 0

    base = api.chat.completions.create(model=BASE_MODEL, messages=HELLO, max_tokens=8, temperature=0)
    assert base.choices[0].message.content != ANSWERS["hello"]


def test_openai_client_streams_a_chat_completion(server: str, env: Env) -> None:
    api = client(server, env.key)
    expected = api.chat.completions.create(
        model=env.checkpoints["merged"], messages=HELLO, max_tokens=8, temperature=0
    )
    stream = api.chat.completions.create(
        model=env.checkpoints["merged"], messages=HELLO, max_tokens=8, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(pieces) > 1, "the answer should arrive in several chunks"
    assert "".join(pieces) == expected.choices[0].message.content == ANSWERS["hello"]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completions_with_logprobs_stop_and_n(server: str, env: Env) -> None:
    api = client(server, env.key)
    out = api.completions.create(
        model=BASE_MODEL, prompt="1+2=", max_tokens=5, temperature=0.8, seed=3, n=2, logprobs=2
    )
    assert [c.index for c in out.choices] == [0, 1]
    for choice in out.choices:
        assert choice.logprobs is not None
        assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) >= 1
        assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
        assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    again = api.completions.create(
        model=BASE_MODEL, prompt="1+2=", max_tokens=5, temperature=0.8, seed=3, n=2
    )
    assert [c.text for c in again.choices] == [c.text for c in out.choices], "a seeded request repeats"

    chat = api.chat.completions.create(
        model=env.checkpoints["adapter"],
        messages=HELLO,
        max_tokens=8,
        temperature=0,
        stop=[" there"],
        logprobs=True,
        top_logprobs=3,
    )
    assert chat.choices[0].message.content == "hello"
    content = chat.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 3 for t in content)


def test_alias_names_the_runs_checkpoint(server: str, env: Env) -> None:
    api = client(server, env.key)
    for alias, kind in [
        (f"{RUN_NAME}:stage-0:step-{TRAIN_STEPS}", "adapter"),
        (f"{RUN_NAME}:merged", "merged"),
    ]:
        chat = api.chat.completions.create(model=alias, messages=HELLO, max_tokens=8, temperature=0)
        assert chat.model == env.checkpoints[kind]


def test_another_teams_checkpoint_does_not_exist(server: str, env: Env) -> None:
    other = client(server, env.other_key)
    assert {m.id for m in other.models.list().data} == {BASE_MODEL}
    for model in (env.checkpoints["adapter"], f"{RUN_NAME}:stage-0:step-{TRAIN_STEPS}"):
        with pytest.raises(openai.NotFoundError) as info:
            other.chat.completions.create(model=model, messages=HELLO, max_tokens=4)
        assert info.value.body["code"] == "model_not_found"


def test_bad_requests_get_the_error_shape(server: str, env: Env) -> None:
    headers = {"Authorization": f"Bearer {env.key}"}
    bad = httpx.post(
        f"{server}/v1/chat/completions",
        headers=headers,
        json={"model": BASE_MODEL, "messages": HELLO, "temperature": 5},
    )
    assert bad.status_code == 422
    assert bad.json()["error"]["param"] == "temperature"
    missing = httpx.post(
        f"{server}/v1/completions", headers=headers, json={"model": "ckpt_nope", "prompt": "x"}
    )
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"


# ---------------------------------------------------------------- in-process: concurrency and memory


async def _chat(http: httpx.AsyncClient, key: str, model: str, max_tokens: int = 8) -> httpx.Response:
    return await http.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": model, "messages": HELLO, "max_tokens": max_tokens, "temperature": 0},
    )


Scenario = Callable[[FastAPI, httpx.AsyncClient], Awaitable[Any]]


def _run_in_app(settings: Settings, scenario: Scenario) -> Any:
    """Returns what `scenario` returns, run against a fresh in-process app (its backend closed after)."""
    app = create_app(settings)

    async def main() -> Any:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as http:
            try:
                return await scenario(app, http)
            finally:
                await close_backend(app)
                app.state.sessions.kw["bind"].dispose()

    return asyncio.run(main())


def test_ten_concurrent_chats_succeed_within_the_cache_bound(env: Env) -> None:
    bound = 10 * 1024**2
    settings = env.settings.model_copy(update={"inference_cache_bytes": bound})
    models = [BASE_MODEL, env.checkpoints["adapter"], env.checkpoints["merged"]]

    async def scenario(app: FastAPI, http: httpx.AsyncClient) -> Any:
        responses = await asyncio.gather(*(_chat(http, env.key, models[i % 3]) for i in range(10)))
        cache = app_backend(app).cache
        return responses, (cache.loads, cache.evictions, cache.accounted_bytes)

    responses, (loads, evictions, accounted) = _run_in_app(settings, scenario)
    assert [r.status_code for r in responses] == [200] * 10, [
        r.text for r in responses if r.status_code != 200
    ]
    finetuned = [r.json()["choices"][0]["message"]["content"] for r in responses[1::3] + responses[2::3]]
    assert set(finetuned) == {ANSWERS["hello"]}
    assert loads == 3 and evictions == 0, "each model loads once, even when asked concurrently"
    assert 0 < accounted <= bound


def test_a_small_cache_bound_evicts_and_is_never_exceeded(env: Env) -> None:
    models = [BASE_MODEL, env.checkpoints["adapter"], env.checkpoints["merged"]]

    async def measure(app: FastAPI, http: httpx.AsyncClient) -> Any:
        assert (await _chat(http, env.key, BASE_MODEL)).status_code == 200
        return app_backend(app).cache.accounted_bytes

    one_model = _run_in_app(env.settings, measure)
    bound = int(one_model * 1.5)  # room for one model at a time
    settings = env.settings.model_copy(update={"inference_cache_bytes": bound})

    async def scenario(app: FastAPI, http: httpx.AsyncClient) -> Any:
        cache = app_backend(app).cache
        peaks, statuses = [], []
        for i in range(6):
            statuses.append((await _chat(http, env.key, models[i % 3])).status_code)
            peaks.append(cache.accounted_bytes)
        return statuses, peaks, cache.evictions, len(cache.entries())

    statuses, peaks, evictions, retained = _run_in_app(settings, scenario)
    assert statuses == [200] * 6
    assert 0 < max(peaks) <= bound
    assert evictions == 5 and retained == 1


def test_generation_does_not_block_the_event_loop(env: Env) -> None:
    async def scenario(app: FastAPI, http: httpx.AsyncClient) -> Any:
        await _chat(http, env.key, BASE_MODEL, max_tokens=1)  # load the model first
        started = time.monotonic()
        long_chat = asyncio.create_task(_chat(http, env.key, BASE_MODEL, max_tokens=400))
        await asyncio.sleep(0.05)
        health = await http.get("/healthz")
        health_at = time.monotonic() - started
        response = await long_chat
        return health.status_code, health_at, time.monotonic() - started, response

    health_status, health_at, chat_done_at, response = _run_in_app(env.settings, scenario)
    assert health_status == 200 and response.status_code == 200
    assert health_at < chat_done_at, "the health check answered while the chat was still generating"
