"""OpenAI wire format on top of an inference backend: request → sampling parameters, generation →
response object, deltas → server-sent event chunks (`data: {...}` then `data: [DONE]`)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response

from app.errors import ApiError, error_payload
from app.ids import new_id
from app.inference.types import (
    Delta,
    Generation,
    InferenceBackend,
    ResolvedModel,
)
from app.schemas.inference import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    TopLogprob,
    Usage,
    dump_chunk,
)
from trainer_core.config import SamplingParams, TokenLogprob

DEFAULT_CHAT_MAX_TOKENS = 512
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
T = TypeVar("T")


def chat_params(req: ChatCompletionRequest) -> SamplingParams:
    """Returns the sampling parameters of a chat request."""
    return SamplingParams(
        max_tokens=req.max_completion_tokens or req.max_tokens or DEFAULT_CHAT_MAX_TOKENS,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=tuple(req.stop or ()),
        seed=req.seed,
        n=req.n,
        logprobs=req.logprobs,
        top_logprobs=(req.top_logprobs or 0) if req.logprobs else 0,
    )


def completion_params(req: CompletionRequest) -> SamplingParams:
    """Returns the sampling parameters of a completion request (`logprobs: k` asks for k alternatives)."""
    return SamplingParams(
        max_tokens=req.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=tuple(req.stop or ()),
        seed=req.seed,
        n=req.n,
        logprobs=req.logprobs is not None,
        top_logprobs=req.logprobs or 0,
    )


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """Returns the conversation as plain `{role, content}` dicts for a chat template."""
    # Templates know system/user/assistant; OpenAI's newer "developer" role is a system message.
    return [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages
    ]


def _chat_logprobs(entries: list[TokenLogprob] | None) -> ChatLogprobs | None:
    if entries is None:
        return None
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=e.token,
                logprob=e.logprob,
                bytes=list(e.token.encode()),
                top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=list(t.encode())) for t, lp in e.top],
            )
            for e in entries
        ]
    )


def _completion_logprobs(entries: list[TokenLogprob] | None, offset: int) -> CompletionLogprobs | None:
    if entries is None:
        return None
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return CompletionLogprobs(
        tokens=[e.token for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[dict(e.top) for e in entries],
        text_offset=offsets,
    )


def _usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def create_chat_completion(
    backend: InferenceBackend, model: ResolvedModel, req: ChatCompletionRequest
) -> ChatCompletion:
    """Returns the chat completion of `req` from `model`."""
    gen = await backend.generate(model, chat_messages(req), chat_params(req))
    return ChatCompletion(
        id=new_id("chatcmpl"),
        created=int(time.time()),
        model=gen.model,
        choices=[
            ChatChoice(
                index=c.index,
                message=AssistantMessage(content=c.text),
                finish_reason=c.finish_reason,
                logprobs=_chat_logprobs(c.logprobs),
            )
            for c in gen.choices
        ],
        usage=_usage(gen.prompt_tokens, gen.completion_tokens),
    )


def _prompts(req: CompletionRequest) -> list[str]:
    return [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)


async def create_completion(
    backend: InferenceBackend, model: ResolvedModel, req: CompletionRequest
) -> Completion:
    """Returns the text completion of every prompt of `req` (choice index = prompt * n + sample)."""
    params = completion_params(req)
    generations: list[tuple[str, Generation]] = []
    for prompt in _prompts(req):
        generations.append((prompt, await backend.generate(model, prompt, params)))
    choices = [
        CompletionChoice(
            index=i * params.n + c.index,
            text=c.text,
            finish_reason=c.finish_reason,
            logprobs=_completion_logprobs(c.logprobs, len(prompt)),
        )
        for i, (prompt, gen) in enumerate(generations)
        for c in gen.choices
    ]
    return Completion(
        id=new_id("cmpl"),
        created=int(time.time()),
        model=model.id,
        choices=choices,
        usage=_usage(
            sum(g.prompt_tokens for _, g in generations), sum(g.completion_tokens for _, g in generations)
        ),
    )


# What nginx logs for a request whose client went away before the answer: nobody reads it.
CLIENT_CLOSED_REQUEST = 499


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        continue


async def until_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T | Response:
    """Returns the work's result (or raises its error), or an empty 499 once the client disconnects
    first: the work is cancelled, so a non-streamed generation stops at its next token instead of
    running for nobody."""
    job, gone = asyncio.ensure_future(work), asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
        if job.done():
            return job.result()
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        for task in (job, gone):
            task.cancel()
        await asyncio.gather(job, gone, return_exceptions=True)


async def _primed(stream: AsyncIterator[T]) -> AsyncIterator[T]:
    """Returns `stream` after its first item arrived, so errors before any output raise here (and get a
    proper status code) instead of inside a response that already started."""
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        first = None

    async def chained() -> AsyncIterator[T]:
        if first is None:
            return
        yield first
        async for item in stream:
            yield item

    return chained()


def _event(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


async def _sse(events: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    try:
        async for payload in events:
            yield _event(payload)
    except ApiError as exc:
        # The status line is already sent: report the failure in-stream, as OpenAI servers do.
        yield _event(error_payload(exc.status_code, exc.code, exc.message, exc.param))
        return
    yield b"data: [DONE]\n\n"


async def stream_chat_completion(
    backend: InferenceBackend, model: ResolvedModel, req: ChatCompletionRequest
) -> AsyncIterator[bytes]:
    """Returns the SSE byte stream of a chat completion; raises before streaming if the model fails."""
    params = chat_params(req)
    deltas = await _primed(backend.stream(model, chat_messages(req), params))
    chunk_id, created = new_id("chatcmpl"), int(time.time())

    def chunk(choices: list[ChatChunkChoice]) -> dict:
        return dump_chunk(ChatCompletionChunk(id=chunk_id, created=created, model=model.id, choices=choices))

    async def events() -> AsyncIterator[dict]:
        yield chunk(
            [ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")) for i in range(params.n)]
        )
        async for d in deltas:
            yield chunk([_chat_chunk_choice(d)])

    return _sse(events())


def _chat_chunk_choice(d: Delta) -> ChatChunkChoice:
    return ChatChunkChoice(
        index=d.index,
        delta=ChatDelta(content=d.text) if d.text else ChatDelta(),
        finish_reason=d.finish_reason,
        logprobs=_chat_logprobs(d.logprobs),
    )


async def stream_completion(
    backend: InferenceBackend, model: ResolvedModel, req: CompletionRequest
) -> AsyncIterator[bytes]:
    """Returns the SSE byte stream of a text completion (prompts one after another)."""
    params = completion_params(req)
    prompts = _prompts(req)
    first = await _primed(backend.stream(model, prompts[0], params))
    chunk_id, created = new_id("cmpl"), int(time.time())

    async def events() -> AsyncIterator[dict]:
        for i, prompt in enumerate(prompts):
            deltas = first if i == 0 else backend.stream(model, prompt, params)
            async for d in deltas:
                choice = CompletionChoice(
                    index=i * params.n + d.index,
                    text=d.text,
                    finish_reason=d.finish_reason,
                    logprobs=_completion_logprobs(d.logprobs, len(prompt)),
                )
                yield dump_chunk(Completion(id=chunk_id, created=created, model=model.id, choices=[choice]))

    return _sse(events())
