"""In-process backend: transformers + peft in the API process behind a memory-bounded LRU of models.

Generation runs in worker threads (never on the event loop); a lock per model serialises requests
on the same weights while different models generate in parallel. Each request decodes with its own
seeded generator, so a seeded request is reproducible whatever else runs.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable

import torch
from starlette.concurrency import run_in_threadpool

from app.errors import ApiError, ServiceUnavailable
from app.inference.cache import CachedModel, ModelCache
from app.inference.loading import LocalModel, encode_prompt, load_local_model
from app.inference.types import (
    Choice,
    Delta,
    Generation,
    LoadedModel,
    Prompt,
    ResolvedModel,
)
from trainer_core import decoding
from trainer_core.config import SamplingParams, TokenLogprob

Loader = Callable[[ResolvedModel, torch.device], LocalModel]
_DONE = object()


class LocalBackend:
    """Serves models with transformers in this process (the embedded default)."""

    name = "local"

    def __init__(self, cache_bytes: int, device: str = "cpu", loader: Loader = load_local_model) -> None:
        self.cache: ModelCache[LocalModel] = ModelCache(cache_bytes)
        self.device = torch.device(device)
        self._loader = loader

    def _acquire(self, model: ResolvedModel) -> CachedModel[LocalModel]:
        key = f"{model.kind}:{model.id}"
        try:
            return self.cache.get(key, lambda: self._loader(model, self.device), lambda m: m.size_bytes)
        except Exception as exc:  # a folder transformers/peft cannot load, whatever the reason
            raise ServiceUnavailable(
                f"model {model.id!r} could not be loaded: {exc}", code="model_load_failed", param="model"
            ) from exc

    def _encode(self, local: LocalModel, prompt: Prompt) -> list[int]:
        try:
            return encode_prompt(local.tokenizer, prompt)
        except ValueError as exc:
            raise ApiError(str(exc), param="messages" if isinstance(prompt, list) else "prompt") from exc

    def _run(
        self,
        model: ResolvedModel,
        prompt: Prompt,
        params: SamplingParams,
        on_delta: Callable[[Delta], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Generation:
        entry = self._acquire(model)
        local = entry.value
        choices: list[Choice] = []
        completion_tokens = 0
        # Under the model's lock: a fast tokenizer is not safe to share between threads.
        with entry.lock:
            prompt_ids = self._encode(local, prompt)
            for index in range(params.n):
                on_text = None
                if on_delta is not None:

                    def on_text(text: str, lps: list[TokenLogprob], index: int = index) -> None:
                        on_delta(Delta(index=index, text=text, logprobs=lps or None))

                out = decoding.decode(
                    local.model,
                    local.tokenizer,
                    prompt_ids,
                    # Choice i of a seeded request uses seed + i: the n samples differ, reproducibly.
                    params.for_sample(index),
                    eos_token_ids=local.eos_token_ids,
                    on_text=on_text,
                    should_stop=should_stop,
                )
                completion_tokens += len(out.token_ids)
                choices.append(Choice(index, out.text, out.finish_reason, out.logprobs))
                if on_delta is not None:
                    on_delta(Delta(index=index, text="", finish_reason=out.finish_reason))
        return Generation(model.id, choices, len(prompt_ids), completion_tokens)

    async def generate(self, model: ResolvedModel, prompt: Prompt, params: SamplingParams) -> Generation:
        """Returns the finished generation, computed in a worker thread."""
        return await run_in_threadpool(self._run, model, prompt, params)

    async def stream(
        self, model: ResolvedModel, prompt: Prompt, params: SamplingParams
    ) -> AsyncIterator[Delta]:
        """Yields deltas as the worker thread produces them; a consumer that stops early stops decoding."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancelled = threading.Event()

        def put(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            try:
                self._run(model, prompt, params, on_delta=put, should_stop=cancelled.is_set)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                put(exc)
            finally:
                put(_DONE)

        task = loop.run_in_executor(None, work)
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, Delta)
                yield item
        finally:
            cancelled.set()
            await asyncio.shield(task)

    def loaded_models(self) -> list[LoadedModel]:
        """Returns the models held in memory, least recently used first."""
        out = []
        for entry in self.cache.entries():
            kind, _, model_id = entry.key.partition(":")
            out.append(LoadedModel(id=model_id, kind=kind, size_bytes=entry.size_bytes))  # type: ignore[arg-type]
        return out

    async def aclose(self) -> None:
        self.cache.clear()
