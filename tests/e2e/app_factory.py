"""Uvicorn factory for the browser tests: the service's own app, with the dashboard router ensured.

app.main registers the dashboard itself; this only covers a tree where that line has not landed.
"""

from __future__ import annotations

from fastapi import FastAPI

from app.main import ROUTERS
from app.main import build_app as build_service_app
from app.routes import dashboard


def build_app() -> FastAPI:
    app = build_service_app()
    if dashboard.router not in ROUTERS:
        app.include_router(dashboard.router)
    return app
