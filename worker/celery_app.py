"""The Celery app of the workers: `celery -A worker.celery_app worker -Q train,cpu,eval`.

Configuration (queues, routes, late acks, one task per child) lives in app.broker so the API
publishes with exactly the settings the worker consumes with.
"""

from __future__ import annotations

import importlib.util

from app.broker import TASK_MODULES, create_celery
from app.settings import get_settings


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


app = create_celery(get_settings())
# Task modules are added by the engineers who own them; import those that exist.
app.conf.include = [m for m in TASK_MODULES if _importable(m)]
