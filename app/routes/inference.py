"""OpenAI-compatible inference: `POST /v1/chat/completions` and `POST /v1/completions`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.deps import CurrentTeam, SessionDep, SettingsDep, StoreDep
from app.errors import error_responses
from app.inference import openai_api
from app.inference.registry import close_backend, get_inference_backend
from app.inference.resolution import resolve_model
from app.inference.types import InferenceBackend
from app.schemas.inference import ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    await close_backend(app)


router = APIRouter(prefix="/v1", tags=["inference"], lifespan=lifespan)
BackendDep = Annotated[InferenceBackend, Depends(get_inference_backend)]
# With `stream: true` the 200 answer is Server-Sent Events: `data: {chunk}` lines, then `data: [DONE]`.
STREAMED = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}}
RESPONSES = {**error_responses(400, 401, 404, 422, 503), **STREAMED}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.post("/chat/completions", response_model=ChatCompletion, responses=RESPONSES)
async def chat_completions(
    request: Request,
    body: ChatCompletionRequest,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    team: CurrentTeam,
    backend: BackendDep,
) -> ChatCompletion | StreamingResponse | Response:
    model = await run_in_threadpool(resolve_model, session, settings, store, team, body.model)
    if body.stream:
        events = await openai_api.stream_chat_completion(backend, model, body)
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
    answer = openai_api.create_chat_completion(backend, model, body)
    return await openai_api.until_disconnected(request, answer)


@router.post("/completions", response_model=Completion, responses=RESPONSES)
async def completions(
    request: Request,
    body: CompletionRequest,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    team: CurrentTeam,
    backend: BackendDep,
) -> Completion | StreamingResponse | Response:
    model = await run_in_threadpool(resolve_model, session, settings, store, team, body.model)
    if body.stream:
        events = await openai_api.stream_completion(backend, model, body)
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
    answer = openai_api.create_completion(backend, model, body)
    return await openai_api.until_disconnected(request, answer)
