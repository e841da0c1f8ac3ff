"""SGLang backend: an SGLang server reached over HTTP, with LoRA adapters loaded on demand.

Facts used (REFERENCE.md, SGLang, checked against v0.5.4's source): `POST /load_lora_adapter
{"lora_name","lora_path"}` and `POST /unload_lora_adapter {"lora_name"}` answer 200 or 400 with
`{"success": false, "error_message", "loaded_adapters"}`; loading a name the server already holds
is such a 400 (after an API restart, or from a second API process), which means "loaded". The
OpenAI-compatible endpoints pick an adapter with `"model": "BASE:NAME"` (from v0.5.4; 0.5.3
answers with the base model, silently) and accept `"lora_path": NAME` too, so adapters need a
server of at least ``MIN_LORA_VERSION`` (``GET /get_server_info`` gives its `version`). An error
during a stream arrives as HTTP 200 and a `data: {"error": …}` event. `seed` is ignored by 0.5.4,
so a seeded request is refused rather than silently unseeded. `GET /get_model_info` gives the
served `model_path`.
Adapters are named by checkpoint id and loaded from the shared checkpoint storage, which the API and
the SGLang server mount at the same path. A short connect timeout makes a server that is down
answer 503 at once instead of hanging the request.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from app.errors import ApiError, ServiceUnavailable
from app.inference.types import (
    Choice,
    Delta,
    FinishReason,
    Generation,
    LoadedModel,
    Prompt,
    ResolvedModel,
)
from trainer_core.config import SamplingParams, TokenLogprob

MIN_LORA_VERSION = (0, 5, 4)


def request_body(served: str, adapter: str | None, prompt: Prompt, params: SamplingParams) -> dict[str, Any]:
    """Returns the OpenAI-shaped body SGLang expects for a chat (message list) or a text prompt."""
    body: dict[str, Any] = {
        "model": f"{served}:{adapter}" if adapter else served,
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "n": params.n,
    }
    if adapter:
        body["lora_path"] = adapter
    if params.stop:
        body["stop"] = list(params.stop)
    if isinstance(prompt, str):
        body["prompt"] = prompt
        if params.logprobs:
            body["logprobs"] = params.top_logprobs
    else:
        body["messages"] = prompt
        if params.logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = params.top_logprobs
    return body


def refuse_unsupported(params: SamplingParams) -> None:
    """Returns when SGLang honours every parameter; raises ApiError naming the one it would ignore."""
    if params.seed is not None:
        raise ApiError(
            "seed is not supported by the SGLang backend (SGLang 0.5.4 ignores it, so the request would "
            "not repeat); leave seed out, or use temperature 0 for reproducible output",
            code="unsupported_parameter", param="seed",
        )


def _finish(reason: str | None) -> FinishReason:
    return "length" if reason == "length" else "stop"


def parse_logprobs(raw: dict[str, Any] | None) -> list[TokenLogprob] | None:
    """Returns token log-probs from either OpenAI shape: chat `{content: [...]}` or completions'
    `{tokens, token_logprobs, top_logprobs}`."""
    if not raw:
        return None
    if "content" in raw:
        return [
            TokenLogprob(
                token=item["token"],
                logprob=float(item["logprob"]),
                top=tuple((t["token"], float(t["logprob"])) for t in item.get("top_logprobs") or []),
            )
            for item in raw["content"] or []
        ]
    tops = raw.get("top_logprobs") or [None] * len(raw.get("tokens", []))
    return [
        TokenLogprob(token=tok, logprob=float(lp), top=tuple((k, float(v)) for k, v in (top or {}).items()))
        for tok, lp, top in zip(raw.get("tokens", []), raw.get("token_logprobs", []), tops, strict=False)
    ]


def parse_generation(model_id: str, data: dict[str, Any]) -> Generation:
    """Returns a Generation from an SGLang chat or completion response body."""
    choices = []
    for raw in data["choices"]:
        text = raw["message"].get("content") or "" if "message" in raw else raw.get("text", "")
        choices.append(
            Choice(
                raw.get("index", 0),
                text,
                _finish(raw.get("finish_reason")),
                parse_logprobs(raw.get("logprobs")),
            )
        )
    usage = data.get("usage") or {}
    return Generation(
        model=model_id,
        choices=sorted(choices, key=lambda c: c.index),
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=int(usage.get("completion_tokens", 0)),
    )


def parse_chunk(data: dict[str, Any]) -> list[Delta]:
    """Returns the deltas of one streamed chunk (chat `delta.content` or completions `text`).

    Raises ApiError for an error event (`{"error": {...}}`), which SGLang sends inside a 200 stream.
    """
    error = data.get("error")
    if error:
        message = error.get("message", error) if isinstance(error, dict) else error
        raise ApiError(f"SGLang failed during the stream: {message}", code="inference_rejected")
    out = []
    for raw in data.get("choices", []):
        text = (raw.get("delta") or {}).get("content") or "" if "delta" in raw else raw.get("text") or ""
        reason = raw.get("finish_reason")
        out.append(
            Delta(
                index=raw.get("index", 0),
                text=text,
                logprobs=parse_logprobs(raw.get("logprobs")),
                finish_reason=_finish(reason) if reason else None,
            )
        )
    return out


def parse_version(text: str) -> tuple[int, ...]:
    """Returns the leading numeric release of a version string ("0.5.4.post1" -> (0, 5, 4))."""
    parts = []
    for piece in text.split("."):
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _already_loaded(response: httpx.Response, name: str) -> bool:
    """Returns whether a refused load means the server holds ``name`` already."""
    try:
        data = response.json()
    except ValueError:
        return False
    if not isinstance(data, dict):
        return False
    loaded = data.get("loaded_adapters") or {}
    return name in loaded or "already" in str(data.get("error_message", "")).lower()


def _server_message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(data, dict):
        if data.get("error_message"):
            return str(data["error_message"])
        error = data.get("error")
        if isinstance(error, dict):
            return str(error.get("message", error))
        return str(data.get("message") or error or data)
    return str(data)


class SGLangBackend:
    """Serves through an SGLang server; keeps at most ``max_loaded_adapters`` adapters loaded (LRU)."""

    name = "sglang"

    def __init__(
        self,
        url: str,
        *,
        max_loaded_adapters: int = 8,
        connect_timeout: float = 2.0,
        read_timeout: float = 600.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.max_loaded_adapters = max_loaded_adapters
        timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self._client = httpx.AsyncClient(base_url=self.url, timeout=timeout, transport=transport)
        self._adapters: OrderedDict[str, Path] = OrderedDict()
        self._in_use: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._served_path: str | None = None
        self._lora_version_ok = False

    async def _post(self, path: str, body: dict[str, Any], *, check: bool = True) -> httpx.Response:
        try:
            response = await self._client.post(path, json=body)
        except httpx.TimeoutException as exc:
            raise ServiceUnavailable(
                f"the SGLang server at {self.url} did not answer {path} in time ({type(exc).__name__})",
                code="inference_unavailable",
            ) from exc
        except httpx.TransportError as exc:
            raise ServiceUnavailable(
                f"the SGLang server at {self.url} is not reachable ({type(exc).__name__}: {exc}); "
                "start it (docker compose --profile serve up -d sglang) "
                "or set TUNEYARD_INFERENCE_BACKEND=local",
                code="inference_unavailable",
            ) from exc
        if check:
            self._raise_for_status(path, response)
        return response

    def _raise_for_status(self, path: str, response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        message = f"SGLang {path} failed ({response.status_code}): {_server_message(response)}"
        if response.status_code >= 500:
            raise ServiceUnavailable(message, code="inference_unavailable")
        raise ApiError(message, code="inference_rejected")

    async def _get(self, path: str) -> dict[str, Any]:
        try:
            response = await self._client.get(path)
        except httpx.TransportError as exc:
            raise ServiceUnavailable(
                f"the SGLang server at {self.url} is not reachable ({type(exc).__name__})",
                code="inference_unavailable",
            ) from exc
        self._raise_for_status(path, response)
        return response.json()

    async def served_model_path(self) -> str:
        """Returns the `model_path` the SGLang server serves (asked once)."""
        if self._served_path is None:
            self._served_path = str((await self._get("/get_model_info"))["model_path"])
        return self._served_path

    async def _check_lora_version(self) -> None:
        """Returns when the server picks adapters per request; refuses older servers (asked once)."""
        if self._lora_version_ok:
            return
        version = str((await self._get("/get_server_info")).get("version", ""))
        if parse_version(version) < MIN_LORA_VERSION:
            wanted = ".".join(map(str, MIN_LORA_VERSION))
            raise ServiceUnavailable(
                f"the SGLang server at {self.url} is version {version or 'unknown'}; serving adapters needs "
                f"SGLang >= {wanted} (older servers answer adapter requests with the base model); "
                f"upgrade the sglang image (SGLANG_TAG=v{wanted})",
                code="inference_unavailable",
            )
        self._lora_version_ok = True

    async def _target(self, model: ResolvedModel) -> tuple[str, str | None]:
        """Returns (served model name, adapter name or None), refusing models this server cannot serve."""
        served = await self.served_model_path()
        same_base = served.rstrip("/") in (str(model.base_path), model.base_model) or (
            Path(served).name == model.base_model
        )
        if model.kind == "merged" or not same_base:
            raise ApiError(
                f"model {model.id!r} needs base weights {model.weights_path}, but the SGLang server serves "
                f"{served}; serve it with the local backend or a server launched with that --model-path",
                code="model_not_served",
                param="model",
            )
        return served, (model.id if model.kind == "adapter" else None)

    async def _acquire_adapter(self, model: ResolvedModel) -> None:
        name, path = model.id, model.checkpoint_path
        assert path is not None
        await self._check_lora_version()
        async with self._lock:
            self._in_use[name] = self._in_use.get(name, 0) + 1
            if name in self._adapters:
                self._adapters.move_to_end(name)
                return
            idle = [n for n in self._adapters if not self._in_use.get(n)]
            while len(self._adapters) >= self.max_loaded_adapters and idle:
                victim = idle.pop(0)
                await self._post("/unload_lora_adapter", {"lora_name": victim})
                del self._adapters[victim]
            try:
                body = {"lora_name": name, "lora_path": str(path)}
                response = await self._post("/load_lora_adapter", body, check=False)
                if not (response.status_code == 400 and _already_loaded(response, name)):
                    self._raise_for_status("/load_lora_adapter", response)
            except BaseException:
                self._release_adapter(name)
                raise
            self._adapters[name] = path

    def _release_adapter(self, name: str) -> None:
        self._in_use[name] -= 1
        if not self._in_use[name]:
            del self._in_use[name]

    async def generate(self, model: ResolvedModel, prompt: Prompt, params: SamplingParams) -> Generation:
        """Returns the generation from SGLang's OpenAI-compatible endpoint."""
        refuse_unsupported(params)
        served, adapter = await self._target(model)
        if adapter:
            await self._acquire_adapter(model)
        try:
            path = "/v1/completions" if isinstance(prompt, str) else "/v1/chat/completions"
            response = await self._post(path, request_body(served, adapter, prompt, params))
            return parse_generation(model.id, response.json())
        finally:
            if adapter:
                self._release_adapter(adapter)

    async def stream(
        self, model: ResolvedModel, prompt: Prompt, params: SamplingParams
    ) -> AsyncIterator[Delta]:
        """Yields deltas parsed from SGLang's server-sent events."""
        refuse_unsupported(params)
        served, adapter = await self._target(model)
        if adapter:
            await self._acquire_adapter(model)
        try:
            path = "/v1/completions" if isinstance(prompt, str) else "/v1/chat/completions"
            body = request_body(served, adapter, prompt, params) | {"stream": True}
            try:
                async with self._client.stream("POST", path, json=body) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        self._raise_for_status(path, response)
                    async for line in response.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        payload = line[len("data:") :].strip()
                        if payload == "[DONE]":
                            break
                        for delta in parse_chunk(json.loads(payload)):
                            yield delta
            except httpx.TransportError as exc:
                raise ServiceUnavailable(
                    f"the SGLang server at {self.url} failed mid-stream ({type(exc).__name__})",
                    code="inference_unavailable",
                ) from exc
        finally:
            if adapter:
                self._release_adapter(adapter)

    def loaded_models(self) -> list[LoadedModel]:
        """Returns the adapters loaded on the server by this process, least recently used first."""
        return [
            LoadedModel(id=name, kind="adapter", extra={"lora_path": str(p)})
            for name, p in self._adapters.items()
        ]

    async def aclose(self) -> None:
        await self._client.aclose()
