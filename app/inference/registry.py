"""One inference backend per app, chosen by the settings and created on first use."""

from __future__ import annotations

import threading

from fastapi import FastAPI, Request

from app.inference.types import InferenceBackend
from app.settings import Settings

_create_lock = threading.Lock()


def create_backend(settings: Settings) -> InferenceBackend:
    """Returns the backend the settings name: SGLang over HTTP, or transformers in this process."""
    if settings.inference_backend == "sglang":
        from app.inference.sglang import SGLangBackend

        assert settings.sglang_url is not None  # the settings refuse sglang without a URL
        return SGLangBackend(settings.sglang_url)
    # Imported here: torch loads only in processes that serve models locally.
    from app.inference.local import LocalBackend

    return LocalBackend(settings.inference_cache_bytes)


def app_backend(app: FastAPI) -> InferenceBackend:
    """Returns the app's backend, creating it once (safe under concurrent first requests)."""
    backend = getattr(app.state, "inference_backend", None)
    if backend is None:
        with _create_lock:
            backend = getattr(app.state, "inference_backend", None)
            if backend is None:
                backend = create_backend(app.state.settings)
                app.state.inference_backend = backend
    return backend


def get_inference_backend(request: Request) -> InferenceBackend:
    return app_backend(request.app)


async def close_backend(app: FastAPI) -> None:
    """Releases the app's backend if one was created."""
    backend = getattr(app.state, "inference_backend", None)
    if backend is not None:
        app.state.inference_backend = None
        await backend.aclose()
