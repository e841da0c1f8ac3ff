"""Webhook endpoints (OpenAI's webhook-endpoint API), Standard Webhooks signing, and delivery records.

A payload is signed per the Standard Webhooks specification with the `standardwebhooks` package:
headers `webhook-id` (the event id, the same on every retry), `webhook-timestamp` and
`webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">` under the endpoint's `whsec_`
secret — what `openai.OpenAI().webhooks.unwrap(body, headers, secret=…)` verifies. After a rotation
that keeps the old secret for 24 hours, each delivery carries a signature under both.
"""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from app.db.models import Team, WebhookDelivery, WebhookDeliveryAttempt, WebhookEndpoint, WebhookEvent, utcnow
from app.errors import Unprocessable
from app.ids import new_id
from app.schemas.common import OpenAIPage
from app.schemas.webhooks import (
    AttemptOut,
    DeliveryOut,
    EndpointCreate,
    EndpointOut,
    EndpointUpdate,
    EndpointWithSecret,
    TestResult,
)
from app.services.outbox import EVENT_TYPES
from app.services.owned import get_owned
from app.services.pagination import paginate

USER_AGENT = "Tuneyard-Webhooks/1"
OLD_SECRET_GRACE = timedelta(hours=24)


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def _ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def _check_event_types(types: list[str], param: str = "event_types") -> list[str]:
    unknown = [t for t in types if t not in EVENT_TYPES]
    if unknown:
        raise Unprocessable(f"{param}: unknown event type(s) {', '.join(unknown)}; this server sends "
                            f"{', '.join(EVENT_TYPES)}", code="invalid_event_type", param=param)
    return list(dict.fromkeys(types))


def endpoint_out(endpoint: WebhookEndpoint) -> EndpointOut:
    return EndpointOut(id=endpoint.id, created_at=_ts(endpoint.created_at) or 0,
                       event_types=endpoint.event_types, name=endpoint.name,
                       signing_secret_hint=f"whsec_…{endpoint.secret[-4:]}", url=endpoint.url,
                       updated_at=_ts(endpoint.updated_at))


def with_secret(endpoint: WebhookEndpoint) -> EndpointWithSecret:
    return EndpointWithSecret(**endpoint_out(endpoint).model_dump(), signing_secret=endpoint.secret)


def create_endpoint(session: Session, team: Team, body: EndpointCreate) -> WebhookEndpoint:
    now = utcnow()
    endpoint = WebhookEndpoint(id=new_id("whep"), team_id=team.id, name=body.name, url=str(body.url),
                               event_types=_check_event_types(body.event_types), secret=new_secret(),
                               created_at=now, updated_at=now)
    session.add(endpoint)
    session.commit()
    return endpoint


def get_endpoint(session: Session, team: Team, endpoint_id: str) -> WebhookEndpoint:
    """Returns the team's endpoint; 404 for a missing one or another team's."""
    return get_owned(session, WebhookEndpoint, team, endpoint_id)


def list_endpoints(session: Session, team: Team, *, limit: int, after: str | None) -> OpenAIPage[EndpointOut]:
    stmt = select(WebhookEndpoint).where(WebhookEndpoint.team_id == team.id)
    rows, has_more, _ = paginate(session, stmt, WebhookEndpoint.id, limit=limit, after=after)
    data = [endpoint_out(e) for e in rows]
    return OpenAIPage[EndpointOut](data=data, has_more=has_more, first_id=data[0].id if data else None,
                                   last_id=data[-1].id if data else None)


def update_endpoint(session: Session, team: Team, endpoint_id: str, body: EndpointUpdate) -> WebhookEndpoint:
    """Returns the endpoint with the given fields replaced (`updated_at` moves only on a real change)."""
    endpoint = get_endpoint(session, team, endpoint_id)
    changes: dict[str, Any] = {}
    if body.url is not None:
        changes["url"] = str(body.url)
    if body.name is not None:
        changes["name"] = body.name
    if body.event_types is not None:
        changes["event_types"] = _check_event_types(body.event_types)
    changed = {k: v for k, v in changes.items() if getattr(endpoint, k) != v}
    for column, value in changed.items():
        setattr(endpoint, column, value)
    if changed:
        endpoint.updated_at = utcnow()
    session.commit()
    return endpoint


def delete_endpoint(session: Session, team: Team, endpoint_id: str) -> None:
    """Deletes the endpoint with its deliveries (pending ones are never sent)."""
    session.delete(get_endpoint(session, team, endpoint_id))
    session.commit()


def rotate_secret(session: Session, team: Team, endpoint_id: str, keep_old: bool) -> WebhookEndpoint:
    endpoint = get_endpoint(session, team, endpoint_id)
    now = utcnow()
    endpoint.previous_secret = endpoint.secret if keep_old else None
    endpoint.previous_secret_expires_at = now + OLD_SECRET_GRACE if keep_old else None
    endpoint.secret, endpoint.updated_at = new_secret(), now
    session.commit()
    return endpoint


# ---------------------------------------------------------------- signing and sending


def signing_secrets(endpoint: WebhookEndpoint, now: datetime) -> list[str]:
    """Returns the secrets a delivery is signed with now: the current one, and the previous one in grace."""
    secrets = [endpoint.secret]
    expires = endpoint.previous_secret_expires_at
    if endpoint.previous_secret and expires is not None and expires > now:
        secrets.append(endpoint.previous_secret)
    return secrets


def signed_headers(secrets: list[str], message_id: str, body: str, when: datetime) -> dict[str, str]:
    """Returns the Standard Webhooks headers of one attempt (the timestamp is the attempt's)."""
    signature = " ".join(Webhook(s).sign(message_id, when, body) for s in secrets)
    return {"webhook-id": message_id, "webhook-timestamp": str(int(when.timestamp())),
            "webhook-signature": signature, "content-type": "application/json", "user-agent": USER_AGENT}


@dataclass(frozen=True)
class AttemptResult:
    status_code: int | None
    error: str | None
    duration_ms: int

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def send(client: httpx.Client, url: str, secrets: list[str], payload: dict[str, Any]) -> AttemptResult:
    """Returns how one signed POST of `payload` went (a non-2xx answer or a network error is not ok)."""
    body = json.dumps(payload, separators=(",", ":"))
    headers = signed_headers(secrets, payload["id"], body, utcnow())
    started = time.monotonic()
    try:
        response = client.post(url, content=body.encode(), headers=headers)
    except httpx.HTTPError as exc:
        return AttemptResult(None, f"{type(exc).__name__}: {exc}"[:1000], _elapsed_ms(started))
    error = None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
    return AttemptResult(response.status_code, error, _elapsed_ms(started))


def _elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def test_endpoint(session: Session, team: Team, endpoint_id: str, event_type: str,
                  timeout_seconds: float) -> TestResult:
    """Returns the receiver's answer to one signed sample event (sent now; not an outbox event)."""
    endpoint = get_endpoint(session, team, endpoint_id)
    _check_event_types([event_type], "event_type")
    event_id = new_id("evt")
    payload = {"id": event_id, "object": "event", "created_at": int(time.time()), "type": event_type,
               "data": {"id": f"{event_type.split('.')[0]}_test"}}
    with httpx.Client(timeout=timeout_seconds, follow_redirects=False) as client:
        result = send(client, endpoint.url, signing_secrets(endpoint, utcnow()), payload)
    if result.status_code is None:
        raise Unprocessable(f"the endpoint did not answer: {result.error}", code="webhook_unreachable",
                            param="url")
    return TestResult(event_type=event_type, status_code=result.status_code, webhook_endpoint_id=endpoint.id)


# ---------------------------------------------------------------- delivery records


def list_deliveries(session: Session, team: Team, endpoint_id: str, *, limit: int,
                    after: str | None) -> OpenAIPage[DeliveryOut]:
    """Returns the endpoint's deliveries newest first, each with every attempt it took."""
    endpoint = get_endpoint(session, team, endpoint_id)
    stmt = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint.id)
    rows, has_more, _ = paginate(session, stmt, WebhookDelivery.id, limit=limit, after=after)
    ids = [d.id for d in rows]
    attempts: dict[str, list[AttemptOut]] = {i: [] for i in ids}
    for a in session.scalars(select(WebhookDeliveryAttempt).where(WebhookDeliveryAttempt.delivery_id.in_(ids))
                             .order_by(WebhookDeliveryAttempt.id)):
        attempts[a.delivery_id].append(AttemptOut(number=a.number, started_at=_ts(a.started_at) or 0,
                                                  duration_ms=a.duration_ms, status_code=a.status_code,
                                                  error=a.error))
    types = dict(session.execute(select(WebhookEvent.id, WebhookEvent.type)
                                 .where(WebhookEvent.id.in_([d.event_id for d in rows]))).all())
    data = [DeliveryOut(id=d.id, webhook_endpoint_id=d.endpoint_id, event_id=d.event_id,
                        event_type=types.get(d.event_id, ""), status=d.status, attempts=attempts[d.id],  # type: ignore[arg-type]
                        next_attempt_at=_ts(d.next_attempt_at) if d.status == "pending" else None,
                        delivered_at=_ts(d.delivered_at), created_at=_ts(d.created_at) or 0) for d in rows]
    return OpenAIPage[DeliveryOut](data=data, has_more=has_more, first_id=data[0].id if data else None,
                                   last_id=data[-1].id if data else None)
