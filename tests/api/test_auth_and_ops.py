"""Auth, the error shape, request ids, health/readiness/metrics, models."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.db.models import ApiKey, Team
from app.main import create_app
from app.services import auth as auth_service
from app.services.auth import create_api_key, hash_key, revoke_key
from tests.api.conftest import Backend, worker_env


def test_missing_and_wrong_keys_are_401(client: TestClient) -> None:
    for headers in ({}, {"Authorization": "Bearer ty_wrong"}, {"Authorization": "Basic abc"}):
        response = client.get("/v1/datasets", headers=headers)
        assert response.status_code == 401
        assert set(response.json()["error"]) == {"type", "code", "message", "param"}
        assert response.json()["error"]["type"] == "authentication_error"


def test_every_response_has_a_request_id(client: TestClient, auth: dict) -> None:
    assert client.get("/healthz").headers["x-request-id"]
    assert client.get("/v1/nope", headers=auth).headers["x-request-id"]
    assert client.get("/healthz", headers={"X-Request-ID": "abc123"}).headers["x-request-id"] == "abc123"


def test_unexpected_error_is_500_without_traceback(backend: Backend) -> None:
    app = create_app(backend.settings)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals")

    with TestClient(app, raise_server_exceptions=False) as c:
        response = c.get("/boom")
    assert response.status_code == 500
    body = response.json()
    assert body["error"]["type"] == "api_error" and "secret" not in response.text
    assert response.headers["x-request-id"] in body["error"]["message"]


def test_auth_disabled_acts_as_default_team(backend: Backend) -> None:
    app = create_app(backend.settings.model_copy(update={"auth_enabled": False}))
    with TestClient(app) as c:
        assert c.get("/v1/datasets").status_code == 200


def test_health_ready_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "tuneyard_http_requests_total" in metrics.text


def test_readyz_503_when_broker_is_down(backend: Backend) -> None:
    app = create_app(backend.settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"}))
    with TestClient(app) as c:
        response = c.get("/readyz")
    assert response.status_code == 503 and response.json()["error"]["code"] == "broker_unavailable"


def test_run_is_created_even_when_broker_is_down(backend: Backend, auth: dict) -> None:
    app = create_app(backend.settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"}))
    with TestClient(app) as c:
        response = c.post("/v1/runs", headers=auth, json={"base_model": "nope", "stages": [
            {"method": "sft", "datasets": [{"id": "ds_x"}]}]})
        assert response.status_code == 422  # validation still answers; creation path below
        models = c.get("/v1/models", headers=auth).json()
    assert "tiny-llama" in [m["id"] for m in models["data"]]  # other tests may add models


def _key_id(client: TestClient, headers: dict[str, str], key: str) -> str:
    listed = client.get("/v1/keys", headers=headers).json()["data"]
    return next(k["id"] for k in listed if key.startswith(k["prefix"]))


def test_a_team_lists_and_revokes_its_own_keys(client: TestClient, backend: Backend, auth: dict,
                                              other_auth: dict) -> None:
    key = auth["Authorization"].removeprefix("Bearer ")
    with backend.app.state.sessions() as session:
        team_id = session.scalar(select(ApiKey.team_id).where(ApiKey.key_hash == hash_key(key)))
        team = session.get(Team, team_id)
        _, second = create_api_key(session, team.name, "ci")
    second_headers = {"Authorization": f"Bearer {second}"}
    listed = client.get("/v1/keys", headers=auth).json()["data"]
    assert [k["name"] for k in listed] == ["", "ci"] and all("hash" not in str(k) for k in listed)
    assert second not in str(listed) and all(k["revoked_at"] is None for k in listed)
    other_key = other_auth["Authorization"].removeprefix("Bearer ")
    other_id = _key_id(client, other_auth, other_key)
    assert client.delete(f"/v1/keys/{other_id}", headers=auth).status_code == 404  # another team's

    assert client.get("/v1/datasets", headers=second_headers).status_code == 200  # cached from here on
    revoked = client.delete(f"/v1/keys/{_key_id(client, auth, second)}", headers=auth)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert client.get("/v1/datasets", headers=second_headers).status_code == 401  # at once in this process
    assert client.get("/v1/datasets", headers=auth).status_code == 200
    assert client.get("/v1/datasets", headers=other_auth).status_code == 200


def test_a_key_revoked_elsewhere_is_refused_within_the_cache_ttl(backend: Backend) -> None:
    ttl = 1.0
    app = create_app(backend.settings.model_copy(update={"auth_cache_seconds": ttl}))
    with backend.app.state.sessions() as session:
        _, key = create_api_key(session, f"ttl-{time.monotonic_ns()}")
    headers = {"Authorization": f"Bearer {key}"}
    with TestClient(app) as c:
        assert c.get("/v1/datasets", headers=headers).status_code == 200
        with backend.app.state.sessions() as session:  # another API process, or `tuneyard keys revoke`
            revoke_key(session, session.scalar(select(ApiKey.id).where(ApiKey.key_hash == hash_key(key))))
        revoked_at = time.monotonic()
        while True:
            # The key was cached before the revoke, so a request *sent* after revoked_at + ttl must find
            # the entry expired, however long the answer then takes on a loaded machine.
            sent = time.monotonic()
            if c.get("/v1/datasets", headers=headers).status_code != 200:
                break
            assert sent - revoked_at <= ttl + 0.05, "a revoked key still works past the cache TTL"
            time.sleep(0.05)
        assert c.get("/v1/datasets", headers=headers).json()["error"]["type"] == "authentication_error"


def test_last_used_is_written_at_most_once_a_minute(client: TestClient, backend: Backend, auth: dict,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    key = auth["Authorization"].removeprefix("Bearer ")

    def last_used() -> datetime | None:
        with backend.app.state.sessions() as session:
            return session.scalar(select(ApiKey.last_used_at).where(ApiKey.key_hash == hash_key(key)))

    client.get("/v1/datasets", headers=auth)
    first = last_used()
    assert first is not None
    for _ in range(5):
        client.get("/v1/datasets", headers=auth)
    assert last_used() == first
    key_id = _key_id(client, auth, key)
    with backend.app.state.sessions() as session:  # a minute passes
        session.execute(update(ApiKey).where(ApiKey.id == key_id)
                        .values(last_used_at=first - timedelta(minutes=2)))
        session.commit()
    later = time.monotonic() + 61
    monkeypatch.setattr(auth_service.time, "monotonic", lambda: later)
    client.get("/v1/datasets", headers=auth)
    assert last_used() > first - timedelta(minutes=1)


def test_keys_list_and_revoke_on_the_command_line(client: TestClient, backend: Backend, auth: dict) -> None:
    key = auth["Authorization"].removeprefix("Bearer ")
    key_id = _key_id(client, auth, key)

    def tuneyard(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tuneyard_cli", "keys", *args],
                              env=worker_env(backend.settings), capture_output=True, text=True, timeout=120)

    listed = tuneyard("list")
    assert listed.returncode == 0 and key_id in listed.stdout and key[:10] in listed.stdout
    assert key not in listed.stdout
    revoked = tuneyard("revoke", key_id)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    assert tuneyard("revoke", "key_nope").returncode == 1
    backend.app.state.keys.forget(key_id)  # this test's app did not revoke it; skip waiting out the TTL
    assert client.get("/v1/datasets", headers=auth).status_code == 401
