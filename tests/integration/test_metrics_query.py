"""Metric series queries on SQLite and PostgreSQL: bucketed min/max/last downsampling computed in
SQL checked against the same buckets computed in Python, filters, and idempotent upserts.
(Timing of a 10,000-step run is printed by bench/metrics_query.py, not asserted here.)"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest
from sqlalchemy.orm import Session

from app.db.migrate import migrate
from app.db.models import Metric, Run, RunStage, Team
from app.db.session import create_db_engine
from app.services.metrics import MetricPoint, query_series, upsert_metrics
from tests.api.conftest import PG_ADMIN, _pg_url

STEPS = 10_000


def loss_at(step: int) -> float:
    return 3.0 * math.exp(-step / 3000) + 0.05 * math.sin(step) + (5.0 if step == 4321 else 0.0)


@pytest.fixture(params=["sqlite", "postgres"], scope="module")
def session(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    if request.param == "sqlite":
        url, drop = f"sqlite:///{tmp_path_factory.mktemp('metrics') / 'm.db'}", None
    else:
        dbname = f"tuneyard_metrics_{os.getpid()}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{dbname}"')
        url, drop = _pg_url(dbname), dbname
    migrate(url)
    engine = create_db_engine(url)
    with Session(engine) as s:
        s.add(Team(id="team_m", name="metrics"))
        s.flush()
        run = Run(id="run_m", team_id="team_m", base_model="tiny-llama", spec={}, status="running")
        run.stages = [RunStage(index=0, method="sft")]
        s.add(run)
        now = datetime.now(UTC)
        points = [MetricPoint(0, step, "train", {"loss": loss_at(step), "lr": 1e-4,
                                                 **({"sparse": float(step)} if step % 3 == 0 else {})}, now)
                  for step in range(1, STEPS + 1)]
        points += [MetricPoint(0, step, "eval", {"eval_loss": loss_at(step)}, now)
                   for step in range(500, STEPS + 1, 500)]
        for i in range(0, len(points), 2000):
            upsert_metrics(s, "run_m", points[i:i + 2000])
        s.commit()
        yield s
    engine.dispose()
    if drop:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{drop}" WITH (FORCE)')


def expected_buckets(rows: list[tuple[int, float | None]], buckets: int) -> list[list[float]]:
    """Returns [last step, last value, min, max] per equal-width step bucket that has a value."""
    low, high = rows[0][0], rows[-1][0]
    width = max(1, -(-(high - low + 1) // buckets))
    grouped: dict[int, list[tuple[int, float]]] = {}
    for step, value in rows:
        if value is not None:
            grouped.setdefault((step - low) // width, []).append((step, value))
    out = []
    for _, present in sorted(grouped.items()):
        values = [v for _, v in present]
        out.append([present[-1][0], present[-1][1], min(values), max(values)])
    return out


def _series(body, name: str, split: str = "train"):  # noqa: ANN001, ANN202
    return next(s for s in body.data if s.name == name and s.split == split)


def test_downsampled_series_match_python_buckets(session: Session) -> None:
    body = query_series(session, "run_m", max_points=200)
    assert {(s.name, s.split) for s in body.data} == {
        ("loss", "train"), ("lr", "train"), ("sparse", "train"), ("eval_loss", "eval")}
    loss = _series(body, "loss")
    assert loss.downsampled and len(loss.points) == 200
    want = expected_buckets([(s, loss_at(s)) for s in range(1, STEPS + 1)], 200)
    assert [p[0] for p in loss.points] == [w[0] for w in want]
    for got, exp in zip(loss.points, want, strict=True):
        assert got[1:] == pytest.approx(exp[1:], abs=1e-12)
    assert max(p[3] for p in loss.points) == pytest.approx(loss_at(4321))  # the spike survives

    # A series missing from some rows: its point is the last step where it has a value.
    sparse = _series(body, "sparse")
    rows = [(s, float(s) if s % 3 == 0 else None) for s in range(1, STEPS + 1)]
    assert sparse.points == [[float(v) for v in w] for w in expected_buckets(rows, 200)]

    eval_loss = _series(body, "eval_loss", "eval")  # 20 points ≤ 200 buckets: returned raw
    assert not eval_loss.downsampled and [p[0] for p in eval_loss.points] == list(range(500, STEPS + 1, 500))
    assert all(p[1] == p[2] == p[3] for p in eval_loss.points)


def test_filters(session: Session) -> None:
    body = query_series(session, "run_m", split="train", names=["loss"], after_step=9_900, max_points=1000)
    assert [(s.name, s.split) for s in body.data] == [("loss", "train")]
    points = body.data[0].points
    assert [p[0] for p in points] == list(range(9_901, STEPS + 1)) and not body.data[0].downsampled
    assert query_series(session, "run_m", stage=1).data == []
    assert query_series(session, "run_m", names=["nope"]).data == []


def test_upsert_is_idempotent(session: Session) -> None:
    now = datetime.now(UTC)
    upsert_metrics(session, "run_m", [MetricPoint(0, 7, "train", {"loss": 42.0}, now),
                                      MetricPoint(0, 7, "train", {"loss": 43.0}, now)])
    upsert_metrics(session, "run_m", [MetricPoint(0, 7, "train", {"loss": 44.0}, now)])
    session.commit()
    rows = session.query(Metric).filter_by(run_id="run_m", stage_index=0, step=7, split="train").all()
    assert [r.values for r in rows] == [{"loss": 44.0}]
    upsert_metrics(session, "run_m", [MetricPoint(0, 7, "train", {"loss": loss_at(7), "lr": 1e-4}, now)])
    session.commit()

