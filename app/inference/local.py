"""In-process backend: transformers + peft in the API process behind a memory-bounded LRU of models.

Generation runs in worker threads (never on the event loop). Requests on the same weights take
turns token by token through the model's fair lock (one team's n=16 x 2,048 tokens no longer makes
another's 2-token request wait for all of it); different models generate in parallel. Each request
decodes with its own seeded generator, so a seeded request is reproducible whatever else runs.

Limits: the prompt plus max_tokens must fit the model's context (a 400 naming the numbers; an
over-long prompt is refused before it is even tokenised); a caller that goes away, or the server
shutting down, stops the decode at the next token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from functools import partial

import anyio
import torch

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

log = logging.getLogger("tuneyard.inference.local")

Loader = Callable[[ResolvedModel, torch.device], LocalModel]
_DONE = object()
# No tokenizer packs more characters than this into one token on average: a prompt longer than
# context x this is refused without tokenising it (a 1 MB prompt cost seconds and 1 GB before).
MAX_CHARS_PER_TOKEN = 32


class LocalBackend:
    """Serves models with transformers in this process (the embedded default)."""

    name = "local"

    def __init__(self, cache_bytes: int, device: str = "cpu", loader: Loader = load_local_model) -> None:
        self.cache: ModelCache[LocalModel] = ModelCache(cache_bytes)
        self.device = torch.device(device)
        self._loader = loader
        self._closing = threading.Event()

    def _acquire(self, model: ResolvedModel) -> CachedModel[LocalModel]:
        key = f"{model.kind}:{model.id}"
        try:
            return self.cache.get(key, lambda: self._loader(model, self.device), lambda m: m.size_bytes)
        except Exception as exc:  # a folder transformers/peft cannot load, whatever the reason
            raise ServiceUnavailable(
                f"model {model.id!r} could not be loaded: {exc}", code="model_load_failed", param="model"
            ) from exc

    def _encode(self, local: LocalModel, prompt: Prompt, max_tokens: int) -> list[int]:
        """Returns the prompt's ids; 400 when the prompt and max_tokens cannot fit the context."""
        param = "messages" if isinstance(prompt, list) else "prompt"
        context = local.context_length
        texts = [prompt] if isinstance(prompt, str) else [str(m.get("content") or "") for m in prompt]
        chars = sum(map(len, texts))
        if chars > context * MAX_CHARS_PER_TOKEN:
            raise ApiError(f"the prompt ({chars} characters) cannot fit this model's context of {context} "
                           "tokens; shorten it", code="context_length_exceeded", param=param)
        try:
            ids = encode_prompt(local.tokenizer, prompt)
        except ValueError as exc:
            raise ApiError(str(exc), param=param) from exc
        if len(ids) + max_tokens > context:
            raise ApiError(f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) is more than this "
                           f"model's context of {context} tokens; shorten the prompt or lower max_tokens",
                           code="context_length_exceeded", param=param)
        return ids

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

        def stopping() -> bool:
            return self._closing.is_set() or (should_stop is not None and should_stop())

        # Under the model's lock: a fast tokenizer is not safe to share between threads.
        with entry.lock:
            prompt_ids = self._encode(local, prompt, params.max_tokens)
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
                should_stop=stopping,
                turn=entry.lock,
            )
            completion_tokens += len(out.token_ids)
            choices.append(Choice(index, out.text, out.finish_reason, out.logprobs))
            if on_delta is not None:
                on_delta(Delta(index=index, text="", finish_reason=out.finish_reason))
            if stopping():
                log.info("%s: generation stopped after %d tokens (the caller went away or the server is "
                         "stopping)", model.id, completion_tokens)
                break
        return Generation(model.id, choices, len(prompt_ids), completion_tokens)

    async def generate(self, model: ResolvedModel, prompt: Prompt, params: SamplingParams) -> Generation:
        """Returns the finished generation, computed in a worker thread.

        Cancelling the awaiting task (the client went away, the server shuts down) stops the
        decode at its next token instead of leaving the thread generating for nobody.
        """
        cancelled = threading.Event()
        try:
            work = partial(self._run, model, prompt, params, should_stop=cancelled.is_set)
            return await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            cancelled.set()
            raise

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
        self._closing.set()  # decodes still running stop at their next token
        self.cache.clear()
