"""The Celery app of the workers: `celery -A worker.celery_app worker -Q train,cpu,eval`.

Configuration (queues, routes, late acks, one task per child) lives in app.broker so the API
publishes with exactly the settings the worker consumes with.
"""

from __future__ import annotations

from app.broker import TASK_MODULES, create_celery
from app.settings import get_settings

app = create_celery(get_settings())
app.conf.include = TASK_MODULES
