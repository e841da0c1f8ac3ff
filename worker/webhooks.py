"""The webhook deliverer: sends the outbox's pending deliveries, retries with exponential backoff.

It runs in the reaper process (its own thread) and may run in several processes at once: a
delivery is taken by one guarded UPDATE that sets `locked_until`, so two deliverers never send it
at the same time, and one that died mid-request (SIGKILL, a lost machine) lets it go when the lock
runs out. Each attempt is recorded before the delivery moves on — delivered on a 2xx answer,
otherwise due again after `base · 2^(attempt-1)` seconds (capped, with ±10 % jitter so endpoints
that failed together do not retry together), failed after `webhook_max_attempts`.

Delivery is at least once: a deliverer killed after the receiver answered 2xx but before the
commit sends the event again, with the same `webhook-id` — receivers de-duplicate by it.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from datetime import datetime, timedelta

import httpx
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import WebhookDelivery, WebhookDeliveryAttempt, WebhookEndpoint, WebhookEvent, utcnow
from app.db.session import make_session_factory
from app.services.webhooks import AttemptResult, send, signing_secrets
from app.settings import Settings

log = logging.getLogger("tuneyard.webhooks")

BATCH = 20


def retry_delay(attempt: int, settings: Settings, jitter: float | None = None) -> float:
    """Returns the seconds before attempt `attempt + 1` after attempt `attempt` failed."""
    base = min(settings.webhook_retry_max_seconds, settings.webhook_retry_base_seconds * 2 ** (attempt - 1))
    factor = 1 + (jitter if jitter is not None else random.uniform(-0.1, 0.1))
    return base * factor


def _lock_seconds(settings: Settings) -> float:
    # Longer than one request may take, so a live deliverer never loses a delivery it is sending.
    return settings.webhook_timeout_seconds * 3 + 5


def take_due(session: Session, now: datetime, settings: Settings, limit: int = BATCH) -> list[str]:
    """Returns the ids of due deliveries this process now holds (committed), oldest due first."""
    free = or_(WebhookDelivery.locked_until.is_(None), WebhookDelivery.locked_until < now)
    due = session.scalars(select(WebhookDelivery.id).where(
        WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now, free)
        .order_by(WebhookDelivery.next_attempt_at).limit(limit)).all()
    held = []
    until = now + timedelta(seconds=_lock_seconds(settings))
    for delivery_id in due:
        moved = session.execute(update(WebhookDelivery).where(
            WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending", free)
            .values(locked_until=until).execution_options(synchronize_session=False)).rowcount
        if moved == 1:
            held.append(delivery_id)
    session.commit()
    return held


def deliver(sessions: sessionmaker[Session], client: httpx.Client, settings: Settings,
            delivery_id: str) -> str:
    """Returns the delivery's status after one attempt: delivered, pending (retry later) or failed."""
    with sessions() as session:
        row = session.execute(
            select(WebhookDelivery, WebhookEvent.payload, WebhookEndpoint)
            .join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id)
            .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
            .where(WebhookDelivery.id == delivery_id)).one_or_none()
        if row is None:
            return "gone"  # the endpoint was deleted meanwhile
        delivery, payload, endpoint = row
        url, secrets, number = endpoint.url, signing_secrets(endpoint, utcnow()), delivery.attempts + 1
    started = utcnow()
    result = send(client, url, secrets, payload)
    return _record(sessions, settings, delivery_id, number, started, result)


def _record(sessions: sessionmaker[Session], settings: Settings, delivery_id: str, number: int,
            started: datetime, result: AttemptResult) -> str:
    now = utcnow()
    if result.ok:
        values = {"status": "delivered", "delivered_at": now}
    elif number >= settings.webhook_max_attempts:
        values = {"status": "failed"}
    else:
        retry_at = now + timedelta(seconds=retry_delay(number, settings))
        values = {"status": "pending", "next_attempt_at": retry_at}
    with sessions() as session:
        moved = session.execute(update(WebhookDelivery).where(
            WebhookDelivery.id == delivery_id, WebhookDelivery.attempts == number - 1)
            .values(attempts=number, locked_until=None, last_status_code=result.status_code,
                    last_error=result.error, **values)
            .execution_options(synchronize_session=False)).rowcount
        if moved != 1:  # deleted with its endpoint, or recorded by a deliverer that outlived our lock
            session.rollback()
            return "gone"
        session.add(WebhookDeliveryAttempt(delivery_id=delivery_id, number=number, started_at=started,
                                           duration_ms=result.duration_ms, status_code=result.status_code,
                                           error=result.error))
        session.commit()
    log.info("webhook delivery %s attempt %d: %s", delivery_id, number,
             values["status"] if result.ok else f"{result.error}; {values['status']}")
    return str(values["status"])


def deliver_due(sessions: sessionmaker[Session], client: httpx.Client, settings: Settings) -> int:
    """Returns how many deliveries were attempted in one pass over the due ones."""
    with sessions() as session:
        held = take_due(session, utcnow(), settings)
    for delivery_id in held:
        deliver(sessions, client, settings, delivery_id)
    return len(held)


def run_deliverer_forever(settings: Settings) -> None:
    """Delivers due webhooks every `webhook_poll_seconds` (at once again while work is left)."""
    sessions = make_session_factory(settings)
    owner = f"{socket.gethostname()}:{os.getpid()}"
    log.info("webhook deliverer started on %s: retries from %.1fs, at most %d attempts", owner,
             settings.webhook_retry_base_seconds, settings.webhook_max_attempts)
    with httpx.Client(timeout=settings.webhook_timeout_seconds, follow_redirects=False) as client:
        while True:
            try:
                busy = deliver_due(sessions, client, settings) == BATCH
            except Exception:  # the database is away: the next pass tries again
                log.exception("webhook delivery pass failed")
                busy = False
            if not busy:
                time.sleep(settings.webhook_poll_seconds)


def start_deliverer(settings: Settings) -> threading.Thread:
    """Returns the daemon thread running the deliverer beside the caller's own loop."""
    thread = threading.Thread(target=run_deliverer_forever, args=(settings,), name="webhook-deliverer",
                              daemon=True)
    thread.start()
    return thread
