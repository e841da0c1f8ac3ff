"""The SGLang backend's HTTP mapping against SGLang-shaped responses (REFERENCE.md, SGLang section):
adapter loading and LRU unloading, `model: "BASE:NAME"`, chat/completion/stream parsing, errors."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.errors import ApiError, ServiceUnavailable
from app.inference.sglang import SGLangBackend
from app.inference.types import ResolvedModel
from trainer_core.config import SamplingParams

SERVED = "/data/models/tiny-llama"
BASE = ResolvedModel(id="tiny-llama", kind="base", base_model="tiny-llama", base_path=Path(SERVED))


def adapter(name: str) -> ResolvedModel:
    return ResolvedModel(
        id=name,
        kind="adapter",
        base_model="tiny-llama",
        base_path=Path(SERVED),
        checkpoint_path=Path(f"/data/storage/checkpoints/{name}"),
    )


class FakeSGLang:
    """Answers like an SGLang server and records every request it got."""

    def __init__(self, version: str = "0.5.4") -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.version = version

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        body = json.loads(request.content) if request.content else {}
        self.requests.append((path, body))
        if path == "/get_model_info":
            return httpx.Response(200, json={"model_path": SERVED, "is_generation": True})
        if path == "/get_server_info":
            return httpx.Response(200, json={"model_path": SERVED, "version": self.version})
        if path == "/load_lora_adapter":
            # SGLang's LoRAUpdateOutput on failure: success false, error_message, loaded_adapters.
            if "bad" in body["lora_path"]:
                return httpx.Response(400, json={"success": False, "error_message": "adapter_config.json "
                                                 "not found", "loaded_adapters": {}})
            if "held" in body["lora_path"]:
                return httpx.Response(400, json={
                    "success": False, "loaded_adapters": {body["lora_name"]: body["lora_path"]},
                    "error_message": f"Failed to load LoRA adapter {body['lora_name']} because it is "
                                     "already loaded"})
            return httpx.Response(200, json={"success": True, "loaded_adapters": {}})
        if path == "/unload_lora_adapter":
            return httpx.Response(200, json={"success": True})
        if path == "/v1/chat/completions" and body.get("stream") and "fail" in body["messages"][0]["content"]:
            error = {"error": {"object": "error", "message": "prompt is too long", "type": "BadRequestError",
                               "code": 400}}
            first = {"choices": [{"index": 0, "delta": {"content": "hel"}, "finish_reason": None}]}
            text = f"data: {json.dumps(first)}\n\ndata: {json.dumps(error)}\n\ndata: [DONE]\n\n"
            return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})
        if path == "/v1/chat/completions" and body.get("stream"):
            events = [
                {
                    "choices": [
                        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    ]
                },
                {"choices": [{"index": 0, "delta": {"content": "hello"}, "finish_reason": None}]},
                {"choices": [{"index": 0, "delta": {"content": " there"}, "finish_reason": None}]},
                {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            ]
            text = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
            return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})
        if path == "/v1/chat/completions":
            return httpx.Response(
                200,
                json={
                    "id": "x",
                    "object": "chat.completion",
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "hello there"},
                            "finish_reason": "stop",
                            "logprobs": {
                                "content": [
                                    {
                                        "token": "hello",
                                        "logprob": -0.1,
                                        "top_logprobs": [{"token": "hello", "logprob": -0.1}],
                                    },
                                    {"token": " there", "logprob": -0.2, "top_logprobs": []},
                                ]
                            },
                        }
                    ],
                    "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9},
                },
            )
        if path == "/v1/completions":
            return httpx.Response(
                200,
                json={
                    "id": "y",
                    "object": "text_completion",
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "text": "3",
                            "finish_reason": "length",
                            "logprobs": {
                                "tokens": ["3"],
                                "token_logprobs": [-0.5],
                                "top_logprobs": [{"3": -0.5, "4": -1.5}],
                                "text_offset": [4],
                            },
                        }
                    ],
                    "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5},
                },
            )
        if path == "/v1/boom":
            return httpx.Response(500, text="internal")
        return httpx.Response(404, json={"detail": "Not Found"})

    def paths(self) -> list[str]:
        return [p for p, _ in self.requests]


def backend(fake: FakeSGLang, **kwargs: Any) -> SGLangBackend:
    return SGLangBackend("http://sglang:30000", transport=httpx.MockTransport(fake), **kwargs)


CHAT = [{"role": "user", "content": "hi"}]


def test_base_model_requests_name_the_served_model_and_map_the_response() -> None:
    fake = FakeSGLang()
    params = SamplingParams(max_tokens=5, temperature=0, stop=("\n",), logprobs=True, top_logprobs=1)
    gen = asyncio.run(backend(fake).generate(BASE, CHAT, params))
    path, body = fake.requests[-1]
    assert path == "/v1/chat/completions"
    assert body == {
        "model": SERVED,
        "messages": CHAT,
        "max_tokens": 5,
        "temperature": 0,
        "top_p": 1.0,
        "n": 1,
        "stop": ["\n"],
        "logprobs": True,
        "top_logprobs": 1,
    }
    assert gen.model == "tiny-llama" and gen.prompt_tokens == 7 and gen.completion_tokens == 2
    choice = gen.choices[0]
    assert (choice.text, choice.finish_reason) == ("hello there", "stop")
    assert [(t.token, t.logprob) for t in choice.logprobs] == [("hello", -0.1), (" there", -0.2)]
    assert choice.logprobs[0].top == (("hello", -0.1),)
    assert "/load_lora_adapter" not in fake.paths()


def test_adapters_load_on_first_use_and_are_picked_with_base_colon_name() -> None:
    fake = FakeSGLang()
    sglang = backend(fake)

    async def two_requests() -> None:
        await sglang.generate(adapter("ckpt_a"), CHAT, SamplingParams())
        await sglang.generate(adapter("ckpt_a"), CHAT, SamplingParams())

    asyncio.run(two_requests())
    loads = [b for p, b in fake.requests if p == "/load_lora_adapter"]
    assert loads == [{"lora_name": "ckpt_a", "lora_path": "/data/storage/checkpoints/ckpt_a"}]
    chats = [b for p, b in fake.requests if p == "/v1/chat/completions"]
    # Both ways of naming the adapter: `model` (v0.5.4+) and `lora_path`.
    assert [(c["model"], c["lora_path"]) for c in chats] == [(f"{SERVED}:ckpt_a", "ckpt_a")] * 2
    assert [m.id for m in sglang.loaded_models()] == ["ckpt_a"]
    assert fake.paths().count("/get_server_info") == 1


def test_least_recently_used_adapter_is_unloaded_past_the_limit() -> None:
    fake = FakeSGLang()
    sglang = backend(fake, max_loaded_adapters=2)

    async def run() -> None:
        for name in ("ckpt_a", "ckpt_b", "ckpt_a", "ckpt_c"):
            await sglang.generate(adapter(name), CHAT, SamplingParams())

    asyncio.run(run())
    assert [b for p, b in fake.requests if p == "/unload_lora_adapter"] == [{"lora_name": "ckpt_b"}]
    assert [m.id for m in sglang.loaded_models()] == ["ckpt_a", "ckpt_c"]


def test_completion_logprobs_map_from_the_legacy_shape() -> None:
    fake = FakeSGLang()
    gen = asyncio.run(backend(fake).generate(BASE, "1+2=", SamplingParams(logprobs=True, top_logprobs=2)))
    _, body = fake.requests[-1]
    assert body["prompt"] == "1+2=" and body["logprobs"] == 2 and "messages" not in body
    choice = gen.choices[0]
    assert (choice.text, choice.finish_reason) == ("3", "length")
    assert choice.logprobs[0].token == "3" and choice.logprobs[0].top == (("3", -0.5), ("4", -1.5))


def test_streamed_chunks_become_deltas() -> None:
    fake = FakeSGLang()

    async def collect() -> list:
        return [d async for d in backend(fake).stream(adapter("ckpt_s"), CHAT, SamplingParams())]

    deltas = asyncio.run(collect())
    assert fake.requests[-1][1]["stream"] is True
    assert "".join(d.text for d in deltas) == "hello there"
    assert deltas[-1].finish_reason == "stop" and all(d.finish_reason is None for d in deltas[:-1])


def test_an_adapter_sglang_cannot_load_is_a_client_error_with_its_message() -> None:
    fake = FakeSGLang()
    sglang = backend(fake)
    with pytest.raises(ApiError) as info:
        asyncio.run(sglang.generate(adapter("ckpt_bad"), CHAT, SamplingParams()))
    assert info.value.status_code == 400 and "adapter_config.json not found" in info.value.message
    assert sglang.loaded_models() == []


def test_an_adapter_the_server_already_holds_counts_as_loaded() -> None:
    # After an API restart, or from a second API process, SGLang answers 400 "already loaded".
    fake = FakeSGLang()
    sglang = backend(fake)
    gen = asyncio.run(sglang.generate(adapter("ckpt_held"), CHAT, SamplingParams()))
    assert gen.choices[0].text == "hello there"
    assert [m.id for m in sglang.loaded_models()] == ["ckpt_held"]
    assert fake.requests[-1][1]["model"] == f"{SERVED}:ckpt_held"


def test_an_error_event_inside_a_200_stream_is_raised_not_swallowed() -> None:
    fake = FakeSGLang()

    async def collect() -> list:
        chat = [{"role": "user", "content": "fail please"}]
        return [d async for d in backend(fake).stream(BASE, chat, SamplingParams())]

    with pytest.raises(ApiError) as info:
        asyncio.run(collect())
    assert "prompt is too long" in info.value.message


def test_seed_is_refused_because_sglang_ignores_it() -> None:
    fake = FakeSGLang()
    with pytest.raises(ApiError) as info:
        asyncio.run(backend(fake).generate(adapter("ckpt_a"), CHAT, SamplingParams(seed=3)))
    assert info.value.status_code == 400 and info.value.param == "seed"
    assert fake.requests == []


def test_adapters_need_sglang_0_5_4_which_honours_base_colon_adapter() -> None:
    old = FakeSGLang(version="0.5.3.post1")
    with pytest.raises(ServiceUnavailable) as info:
        asyncio.run(backend(old).generate(adapter("ckpt_a"), CHAT, SamplingParams()))
    assert "0.5.3.post1" in info.value.message and ">= 0.5.4" in info.value.message
    assert "/load_lora_adapter" not in old.paths()
    # Base-model requests do not depend on adapter selection and still work on it.
    assert asyncio.run(backend(old).generate(BASE, CHAT, SamplingParams())).choices[0].text == "hello there"


def test_models_this_server_does_not_serve_are_refused() -> None:
    fake = FakeSGLang()
    merged = ResolvedModel(
        id="ckpt_m",
        kind="merged",
        base_model="tiny-llama",
        base_path=Path(SERVED),
        checkpoint_path=Path("/data/storage/checkpoints/ckpt_m"),
    )
    other = ResolvedModel(
        id="big-llama", kind="base", base_model="big-llama", base_path=Path("/data/models/big-llama")
    )
    for model in (merged, other):
        with pytest.raises(ApiError) as info:
            asyncio.run(backend(fake).generate(model, CHAT, SamplingParams()))
        assert info.value.code == "model_not_served"


def test_a_server_error_is_503() -> None:
    def failing(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/get_model_info":
            return httpx.Response(200, json={"model_path": SERVED})
        return httpx.Response(500, text="CUDA out of memory")

    sglang = SGLangBackend("http://sglang:30000", transport=httpx.MockTransport(failing))
    with pytest.raises(ServiceUnavailable) as info:
        asyncio.run(sglang.generate(BASE, CHAT, SamplingParams()))
    assert "CUDA out of memory" in info.value.message


def test_a_server_that_is_down_answers_503_at_once() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sglang = SGLangBackend(f"http://127.0.0.1:{port}", connect_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as info:
        asyncio.run(sglang.generate(BASE, CHAT, SamplingParams()))
    assert time.monotonic() - started < 3
    assert "not reachable" in info.value.message and info.value.code == "inference_unavailable"
