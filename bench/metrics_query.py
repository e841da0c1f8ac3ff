"""Time GET /v1/runs/{id}/metrics on a 10,000-step run (PostgreSQL, and SQLite for comparison).

    .venv/bin/python bench/metrics_query.py [--steps 10000] [--max-points 500] [--repeat 15]

Seeds one run with `--steps` train points of 12 metrics each (plus an eval point every 100 steps)
into a scratch database, then times the whole HTTP request (auth, SQL downsampling, JSON) through
the ASGI app, and the service call alone. The target is < 200 ms for the HTTP request.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from common import header, median, percentile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastapi.testclient import TestClient  # noqa: E402

from app.db.migrate import migrate  # noqa: E402
from app.db.models import Run, RunStage  # noqa: E402
from app.ids import new_id  # noqa: E402
from app.main import create_app  # noqa: E402
from app.services.auth import create_api_key  # noqa: E402
from app.services.metrics import MetricPoint, query_series, upsert_metrics  # noqa: E402
from app.settings import Settings  # noqa: E402

PG_ADMIN = os.environ.get("TUNEYARD_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
NAMES = ["loss", "mean_token_accuracy", "num_tokens", "lr", "grad_norm", "tokens_per_second", "step_time",
         "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"]


def seed(settings: Settings, steps: int) -> tuple[str, str]:
    """Returns (API key, run id) of a run holding `steps` train points and an eval point per 100 steps."""
    migrate(settings.database_url)
    app = create_app(settings)
    with app.state.sessions() as session:
        team, key = create_api_key(session, "bench")
        run = Run(id=new_id("run"), team_id=team.id, base_model="tiny-llama", spec={}, status="succeeded")
        run.stages = [RunStage(index=0, method="sft", status="succeeded", step=steps, total_steps=steps)]
        session.add(run)
        session.commit()
        now = datetime.now(UTC)
        points = [MetricPoint(0, s, "train", {n: math.exp(-s / 4000) + 0.01 * i * math.sin(s)
                                              for i, n in enumerate(NAMES)}, now)
                  for s in range(1, steps + 1)]
        points += [MetricPoint(0, s, "eval", {"eval_loss": math.exp(-s / 4000)}, now)
                   for s in range(100, steps + 1, 100)]
        for i in range(0, len(points), 2000):
            upsert_metrics(session, run.id, points[i:i + 2000])
        session.commit()
    app.state.sessions.kw["bind"].dispose()
    return key, run.id


def time_backend(name: str, settings: Settings, args: argparse.Namespace) -> None:
    key, run_id = seed(settings, args.steps)
    app = create_app(settings)
    http_ms: list[float] = []
    service_ms: list[float] = []
    with TestClient(app) as client:
        headers = {"Authorization": f"Bearer {key}"}
        params = {"max_points": args.max_points}
        body = client.get(f"/v1/runs/{run_id}/metrics", headers=headers, params=params).json()  # warm-up
        for _ in range(args.repeat):
            started = time.perf_counter()
            response = client.get(f"/v1/runs/{run_id}/metrics", headers=headers, params=params)
            http_ms.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200
            with app.state.sessions() as session:
                started = time.perf_counter()
                query_series(session, run_id, max_points=args.max_points)
                service_ms.append((time.perf_counter() - started) * 1000)
    app.state.sessions.kw["bind"].dispose()
    series = body["data"]
    longest = max(len(s["points"]) for s in series)
    print(f"{name:>8}: {args.steps} steps x {len(NAMES)} metrics -> {len(series)} series, "
          f"<= {longest} points each | HTTP median {median(http_ms):.1f} ms, "
          f"p90 {percentile(sorted(http_ms), 0.9):.1f} ms | "
          f"service median {median(service_ms):.1f} ms | target < 200 ms: "
          f"{'OK' if median(http_ms) < 200 else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--max-points", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    print(header("metrics query (downsampled)"))
    with tempfile.TemporaryDirectory() as tmp:
        dbname = f"tuneyard_bench_metrics_{os.getpid()}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{dbname}"')
        try:
            server = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
            url = f"{server}/{dbname}"
            time_backend("postgres", Settings(data_dir=Path(tmp) / "pg", database_url=url, env="test"), args)
        finally:
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        time_backend("sqlite", Settings(data_dir=Path(tmp) / "lite", env="test"), args)


if __name__ == "__main__":
    main()
