"""The polled reads (run status, metrics) on SQLite and PostgreSQL: how many statements they cost,
what the per-process snapshot cache serves, and when it lets go."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy import event, update

from app.db.models import Run, RunStage, utcnow
from app.ids import new_id
from app.main import create_app
from app.services.auth import create_api_key
from app.services.metrics import MetricPoint, upsert_metrics
from tests.api.conftest import Backend

TTL = 0.5


@contextmanager
def counted(app: object) -> Iterator[list[str]]:
    """Yields the list of SQL statements the app's engine runs inside the block."""
    engine = app.state.sessions.kw["bind"]  # type: ignore[attr-defined]
    statements: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)


def running_run(backend: Backend, team_id: str) -> str:
    """Returns the id of a running two-stage run of the team with 10 train points in stage 0."""
    start = utcnow() - timedelta(seconds=100)
    with backend.app.state.sessions() as session:
        run = Run(id=new_id("run"), team_id=team_id, name="polled", status="running", base_model="tiny-llama",
                  spec={}, attempt=1, started_at=start)
        run.stages = [RunStage(index=0, method="sft", status="running", step=10, total_steps=100,
                               seconds_per_step=2.0, started_at=start),
                      RunStage(index=1, method="dpo", status="pending", step=0)]
        session.add(run)
        session.flush()
        points = [MetricPoint(0, step, "train", {"loss": 1.0 / step}, start + timedelta(seconds=step))
                  for step in range(1, 11)]
        upsert_metrics(session, run.id, points)
        session.commit()
        return run.id


def new_client(backend: Backend) -> tuple[TestClient, dict[str, str], str]:
    app = create_app(backend.settings.model_copy(update={"api_snapshot_seconds": TTL}))
    with backend.app.state.sessions() as session:
        team, key = create_api_key(session, f"poll-{time.monotonic_ns()}")
    return TestClient(app), {"Authorization": f"Bearer {key}"}, team.id


def move_stage(backend: Backend, run_id: str, step: int) -> None:
    with backend.app.state.sessions() as session:  # what the worker's reporter does
        session.execute(update(RunStage).where(RunStage.run_id == run_id, RunStage.index == 0)
                        .values(step=step))
        session.commit()


def test_run_status_is_one_statement_then_served_from_the_snapshot(backend: Backend) -> None:
    client, auth, team_id = new_client(backend)
    run_id = running_run(backend, team_id)
    with client:
        assert client.get("/v1/datasets", headers=auth).status_code == 200  # the key is cached from here
        with counted(client.app) as statements:
            first = client.get(f"/v1/runs/{run_id}", headers=auth).json()
        assert len(statements) == 1, statements  # the run with its stages; no auth, no ETA aggregate
        assert first["stages"][0]["step"] == 10 and first["progress"]["eta_seconds"] == 2.0 * (100 - 10)

        move_stage(backend, run_id, 20)
        with counted(client.app) as statements:
            assert client.get(f"/v1/runs/{run_id}", headers=auth).json() == first
        assert statements == []  # within the TTL: no query at all
        time.sleep(TTL + 0.1)
        assert client.get(f"/v1/runs/{run_id}", headers=auth).json()["stages"][0]["step"] == 20

        assert client.post(f"/v1/runs/{run_id}/cancel", headers=auth).json()["status"] == "cancelling"
        # the cancel dropped the snapshot at once
        assert client.get(f"/v1/runs/{run_id}", headers=auth).json()["status"] == "cancelling"


def test_another_team_never_gets_a_cached_run(backend: Backend, other_auth: dict) -> None:
    client, auth, team_id = new_client(backend)
    run_id = running_run(backend, team_id)
    with client:
        assert client.get(f"/v1/runs/{run_id}", headers=auth).status_code == 200
        assert client.get(f"/v1/runs/{run_id}/metrics", headers=auth).status_code == 200
        for path in (f"/v1/runs/{run_id}", f"/v1/runs/{run_id}/metrics"):
            response = client.get(path, headers=other_auth)
            assert response.status_code == 404 and response.json()["error"]["param"] == "run_id"
        assert client.get("/v1/runs/run_nope/metrics", headers=auth).status_code == 404


def test_metrics_are_recomputed_only_when_the_run_moved(backend: Backend) -> None:
    client, auth, team_id = new_client(backend)
    run_id = running_run(backend, team_id)
    path = f"/v1/runs/{run_id}/metrics"
    with client:
        client.get("/v1/datasets", headers=auth)
        first = client.get(path, headers=auth).json()
        assert [p[0] for p in first["data"][0]["points"]] == list(range(1, 11))
        with counted(client.app) as statements:
            assert client.get(path, headers=auth).json() == first
        assert statements == []
        time.sleep(TTL + 0.1)
        with counted(client.app) as statements:
            assert client.get(path, headers=auth).json() == first
        assert len(statements) == 1  # the run has not moved: one look at its version, no series query

        with backend.app.state.sessions() as session:
            upsert_metrics(session, run_id, [MetricPoint(0, 11, "train", {"loss": 0.05}, utcnow())])
            session.commit()
        move_stage(backend, run_id, 11)
        time.sleep(TTL + 0.1)
        polled = client.get(path, params={"after_step": 10}, headers=auth).json()
        assert [p[:2] for p in polled["data"][0]["points"]] == [[11, 0.05]]
        assert client.get(path, headers=auth).json()["data"][0]["points"][-1][:2] == [11, 0.05]


def test_the_polled_lane_answers_like_the_documented_routes(backend: Backend) -> None:
    """app.polled answers run status and metrics before routing; what it leaves to the routes (a
    query that does not validate, a trailing slash, another method) gets the routes' answers, and the
    request metrics still name the documented route."""
    client, auth, team_id = new_client(backend)
    run_id = running_run(backend, team_id)
    path = f"/v1/runs/{run_id}/metrics"
    with client:
        assert client.get(f"/v1/runs/{run_id}").json()["error"]["code"] == "missing_api_key"
        for wrong in ("Basic abc", "Bearer ty_nope"):
            assert client.get(f"/v1/runs/{run_id}", headers={"Authorization": wrong}).status_code == 401
        filtered = client.get(path, params={"names": " loss , nope", "split": "train", "stage": 0,
                                            "max_points": 5, "unknown": "ignored"}, headers=auth).json()
        assert [s["name"] for s in filtered["data"]] == ["loss"] and len(filtered["data"][0]["points"]) == 5
        for params, field in (({"max_points": 1}, "max_points"), ({"after_step": "-1"}, "after_step"),
                              ({"stage": "x"}, "stage"), ({"stage": ""}, "stage"),
                              ({"split": "s" * 21}, "split")):
            refused = client.get(path, params=params, headers=auth)
            assert refused.status_code == 422, (params, refused.text)
            assert refused.json()["error"]["param"] == field, refused.json()
        slash = client.get(f"/v1/runs/{run_id}/", headers=auth, follow_redirects=False)
        assert slash.status_code in (307, 404)
        assert client.delete(f"/v1/runs/{run_id}", headers=auth).status_code == 405
        # the route label of the request metrics, as routing would have set it
        exposition = client.get("/metrics").text
        assert 'route="/v1/runs/{run_id}",status="200"' in exposition
        assert 'route="/v1/runs/{run_id}/metrics",status="200"' in exposition
        assert 'route="/v1/runs/{run_id}/metrics",status="422"' in exposition
