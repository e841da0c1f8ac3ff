"""Metrics ingest into PostgreSQL: the worker's DbReporter vs a naive writer and the COPY ceiling.

    .venv/bin/python bench/metrics_ingest.py [--steps 20000] [--values 10] [--rounds 3]

A "point" is one metric value: a train step reported with 10 values (loss, lr, grad_norm, …) is 10
points and one row of `metrics` (rows are keyed by (run, stage, step, split), values in a JSON
column). Every `--eval-every` steps an eval row with 3 values is reported too, as the loop does.

Writers, each on its own fresh run, alternating round by round:
- reporter: `worker.reporter.DbReporter.on_metrics` then `flush()` — batched, fenced upserts as in
  a real run (default batch settings: 64 rows or 1 s).
- per_step: one fenced upsert transaction per reported row (what an unbatched reporter would do).
- copy: psycopg COPY of the same rows into the table (no fence, no upsert): the database's ceiling.

After each run the rows and the JSON keys in the database are counted: nothing may be lost. The
reporter run then re-reports its last 10% of steps (a resumed attempt) and the row count must not
change (idempotent upserts).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from common import fresh_database, header, median
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Metric, Run, RunStage, Team
from app.db.session import create_db_engine
from app.ids import new_id
from app.jobs.lease import Claim, Lease, fence
from app.jobs.states import RUN
from app.services.metrics import MetricPoint, upsert_metrics
from worker.reporter import DbReporter

TARGET_POINTS_PER_SECOND = 20_000
TRAIN_NAMES = [
    "loss",
    "mean_token_accuracy",
    "lr",
    "grad_norm",
    "num_tokens",
    "tokens_per_second",
    "step_time",
    "epoch",
    "throughput",
    "memory_gb",
    "loss_ema",
    "aux",
]
EVAL_NAMES = ["eval_loss", "perplexity", "eval_mean_token_accuracy"]


@dataclass(frozen=True)
class Report:
    stage_index: int
    step: int
    split: str
    values: dict[str, float]


@dataclass
class IngestResult:
    writer: str
    seconds: float
    rows: int
    points: int
    rows_found: int
    points_found: int
    series_found: int

    @property
    def points_per_second(self) -> float:
        return self.points / self.seconds


def reports(steps: int, values: int, eval_every: int) -> Iterator[Report]:
    """Yields what a training loop reports: one train row per step, an eval row every `eval_every` steps."""
    names = TRAIN_NAMES[:values]
    for step in range(1, steps + 1):
        yield Report(0, step, "train", {name: step * 1e-3 + i for i, name in enumerate(names)})
        if step % eval_every == 0:
            yield Report(0, step, "eval", {name: 1.0 / step + i for i, name in enumerate(EVAL_NAMES)})


def seed_run(sessions: sessionmaker[Session], team_id: str) -> str:
    """Returns the id of a new running run (attempt 1) with one running SFT stage."""
    run = Run(
        id=new_id("run"),
        team_id=team_id,
        status="running",
        base_model="tiny-llama",
        spec={},
        attempt=1,
        heartbeat_at=datetime.now(UTC),
    )
    run.stages = [RunStage(index=0, method="sft", status="running", step=0, total_steps=10**6)]
    with sessions() as session:
        session.add(run)
        session.commit()
    return run.id


def write_reporter(sessions: sessionmaker[Session], team_id: str, run_id: str, batch: list[Report]) -> None:
    lease = Lease(sessions, RUN, run_id, 1, heartbeat_seconds=60.0)  # not started: the bench never stops
    reporter = DbReporter(sessions, Path("/tmp"), Claim(RUN, run_id, 1, None), team_id, lease)
    for r in batch:
        reporter.on_metrics(r.stage_index, r.step, r.split, r.values)
    reporter.flush()


def write_per_step(sessions: sessionmaker[Session], team_id: str, run_id: str, batch: list[Report]) -> None:
    with sessions() as session:
        for r in batch:
            fence(session, RUN, run_id, 1)
            upsert_metrics(
                session, run_id, [MetricPoint(r.stage_index, r.step, r.split, r.values, datetime.now(UTC))]
            )
            session.commit()


def write_copy(sessions: sessionmaker[Session], team_id: str, run_id: str, batch: list[Report]) -> None:
    import orjson

    with sessions() as session:
        raw = session.connection().connection.driver_connection
        now = datetime.now(UTC)
        with (
            raw.cursor() as cursor,
            cursor.copy(
                'COPY metrics (run_id, stage_index, step, split, "values", created_at) FROM STDIN'
            ) as copy,
        ):
            for r in batch:
                copy.write_row((run_id, r.stage_index, r.step, r.split, orjson.dumps(r.values).decode(), now))
        session.commit()


WRITERS: dict[str, Callable[[sessionmaker[Session], str, str, list[Report]], None]] = {
    "reporter": write_reporter,
    "per_step": write_per_step,
    "copy": write_copy,
}


def count_stored(sessions: sessionmaker[Session], run_id: str) -> tuple[int, int]:
    """Returns (rows, metric values) stored for a run, counting the keys of every JSON values object."""
    with sessions() as session:
        rows = session.scalar(select(func.count()).select_from(Metric).where(Metric.run_id == run_id))
        points = session.scalar(
            text(
                "SELECT coalesce(sum((SELECT count(*) FROM json_object_keys(m.values))), 0) "
                "FROM metrics m WHERE m.run_id = :run_id"
            ),
            {"run_id": run_id},
        )
    return int(rows or 0), int(points or 0)


def run_writer(name: str, sessions: sessionmaker[Session], team_id: str, batch: list[Report]) -> IngestResult:
    run_id = seed_run(sessions, team_id)
    start = time.perf_counter()
    WRITERS[name](sessions, team_id, run_id, batch)
    seconds = time.perf_counter() - start
    rows_found, points_found = count_stored(sessions, run_id)
    points = sum(len(r.values) for r in batch)
    return IngestResult(
        name, seconds, len(batch), points, rows_found, points_found, count_series(sessions, run_id)
    )


def count_series(sessions: sessionmaker[Session], run_id: str) -> int:
    """Returns how many (stage, split, name) series the run's series catalog lists (COPY keeps none)."""
    with sessions() as session:
        return int(
            session.scalar(text("SELECT count(*) FROM metric_series WHERE run_id = :r"), {"r": run_id})
        )


def replay_is_idempotent(sessions: sessionmaker[Session], team_id: str, batch: list[Report]) -> str:
    """Returns a verdict line after re-reporting the last tenth of a run's steps through the reporter."""
    run_id = seed_run(sessions, team_id)
    write_reporter(sessions, team_id, run_id, batch)
    before = count_stored(sessions, run_id)
    write_reporter(sessions, team_id, run_id, batch[-max(1, len(batch) // 10) :])
    after = count_stored(sessions, run_id)
    verdict = (
        "OK" if before == after == (len(batch), sum(len(r.values) for r in batch)) else "DUPLICATES OR LOSS"
    )
    return f"replay of the last 10% of steps (resumed attempt): rows/points {before} -> {after}: {verdict}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20_000, help="train steps reported per run")
    parser.add_argument(
        "--values", type=int, default=10, help=f"values per train row (<= {len(TRAIN_NAMES)})"
    )
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--per-step-steps",
        type=int,
        default=2_000,
        help="steps for the slow one-transaction-per-row writer (its rate is per point)",
    )
    parser.add_argument("--writers", default=",".join(WRITERS), help="comma-separated subset of writers")
    parser.add_argument("--smoke", action="store_true", help="a tiny run to check the script works")
    args = parser.parse_args(argv)
    writers = [w for w in args.writers.split(",") if w]
    if args.smoke:
        args.steps, args.per_step_steps, args.rounds = 200, 50, 1
    print(header("metrics_ingest (PostgreSQL)"))
    full = list(reports(args.steps, args.values, args.eval_every))
    small = list(reports(args.per_step_steps, args.values, args.eval_every))
    with fresh_database(f"tuneyard_bench_metrics_{os.getpid()}") as url:
        engine = create_db_engine(url)
        sessions = sessionmaker(bind=engine, expire_on_commit=False)
        with sessions() as session:
            team = Team(id=new_id("team"), name="bench")
            session.add(team)
            session.commit()
        results: list[IngestResult] = []
        for _ in range(args.rounds):
            for name in writers:
                result = run_writer(name, sessions, team.id, small if name == "per_step" else full)
                results.append(result)
                print(
                    f"  {name:<9} {result.points_per_second:>10,.0f} points/s  ({result.rows:,} rows, "
                    f"{result.points:,} points in {result.seconds:.2f}s; stored {result.rows_found:,} rows, "
                    f"{result.points_found:,} points, {result.series_found} series in the catalog)",
                    flush=True,
                )
        idempotency = replay_is_idempotent(sessions, team.id, full[: max(10, len(full) // 4)])
        engine.dispose()
    report(results, idempotency)


def report(results: list[IngestResult], idempotency: str) -> None:
    rates = {name: median([r.points_per_second for r in results if r.writer == name]) for name in WRITERS}
    if any(rate != rate for rate in rates.values()):  # a writer left out with --writers: no ratios
        print(f"\npoints/s (median): {rates}")
        print(idempotency)
        return
    lost = [r for r in results if (r.rows_found, r.points_found) != (r.rows, r.points)]
    print(
        f"\npoints/s (median): reporter {rates['reporter']:,.0f}  per_step {rates['per_step']:,.0f}  "
        f"copy {rates['copy']:,.0f}"
    )
    print(
        f"reporter vs per-step commits {rates['reporter'] / rates['per_step']:.1f}x; "
        f"reporter vs COPY ceiling {rates['reporter'] / rates['copy']:.0%}"
    )
    ok = rates["reporter"] >= TARGET_POINTS_PER_SECOND
    print(
        f"target reporter >= {TARGET_POINTS_PER_SECOND:,} points/s: {'MET' if ok else 'MISSED'}; "
        f"lost points: {'none' if not lost else ', '.join(r.writer for r in lost)}"
    )
    print(idempotency)


if __name__ == "__main__":
    main()
