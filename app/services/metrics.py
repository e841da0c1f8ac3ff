"""Metric points: idempotent batched writes, series queries downsampled in SQL, run progress and ETA.

Downsampling is bucketed min/max/last: the rows of each (stage, split) are cut into at most
`max_points` buckets of consecutive steps (`ntile`), and every series gets one point per bucket —
the last step in the bucket where it has a value, that value, and the bucket's min and max, so
spikes stay visible. With fewer rows than buckets every row is its own bucket (no loss at all).
The bucketing, extraction from the JSON column and aggregation all run in the database.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, func, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from app.db.models import Metric, Run
from app.schemas.metrics import MetricSeries, MetricSeriesList, ProgressOut

POINT_COLUMNS = ["step", "value", "min", "max"]
ETA_WINDOW = 20  # recent train steps whose timing gives the ETA


@dataclass(frozen=True)
class MetricPoint:
    stage_index: int
    step: int
    split: str
    values: dict[str, float | None]
    created_at: datetime


def upsert_metrics(session: Session, run_id: str, points: list[MetricPoint]) -> None:
    """Writes points keyed by (run, stage, step, split); a point written again replaces the old values."""
    if not points:
        return
    # The last report of a key in one batch wins, as it would across batches.
    unique = {(p.stage_index, p.step, p.split): p for p in points}
    rows = [{"run_id": run_id, "stage_index": p.stage_index, "step": p.step, "split": p.split,
             "values": p.values, "created_at": p.created_at} for p in unique.values()]
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    stmt = insert(Metric).values(rows)
    stmt = stmt.on_conflict_do_update(
        index_elements=["run_id", "stage_index", "step", "split"],
        set_={"values": stmt.excluded["values"], "created_at": stmt.excluded.created_at},
    )
    session.execute(stmt)


def _filters(run_id: str, stage: int | None, split: str | None, after_step: int | None) -> list[Any]:
    where = [Metric.run_id == run_id]
    if stage is not None:
        where.append(Metric.stage_index == stage)
    if split is not None:
        where.append(Metric.split == split)
    if after_step is not None:
        where.append(Metric.step > after_step)
    return where


def series_names(session: Session, run_id: str, stage: int | None, split: str | None,
                 after_step: int | None) -> list[tuple[int, str, str]]:
    """Returns every (stage, split, name) that has at least one point under the filters."""
    dialect = session.get_bind().dialect.name
    keys = "json_object_keys(m.values)" if dialect == "postgresql" else "json_each(m.\"values\")"
    key_col = "k" if dialect == "postgresql" else "k.key"
    clauses = ["m.run_id = :run_id"]
    params: dict[str, Any] = {"run_id": run_id}
    for column, value in (("stage_index", stage), ("split", split)):
        if value is not None:
            clauses.append(f"m.{column} = :{column}")
            params[column] = value
    if after_step is not None:
        clauses.append("m.step > :after_step")
        params["after_step"] = after_step
    sql = (f"SELECT DISTINCT m.stage_index, m.split, {key_col} FROM metrics m, {keys} AS k "
           f"WHERE {' AND '.join(clauses)}")
    return sorted((int(s), sp, n) for s, sp, n in session.execute(text(sql), params))


def query_series(session: Session, run_id: str, *, stage: int | None = None, split: str | None = None,
                 names: list[str] | None = None, after_step: int | None = None,
                 max_points: int = 1000) -> MetricSeriesList:
    """Returns the run's metric series, each with at most `max_points` points (see the module doc)."""
    found = series_names(session, run_id, stage, split, after_step)
    if names:
        wanted = set(names)
        found = [f for f in found if f[2] in wanted]
    by_name = sorted({name for _, _, name in found})
    if not by_name:
        return MetricSeriesList(data=[], columns=POINT_COLUMNS)
    where = _filters(run_id, stage, split, after_step)
    values = [Metric.values[name].as_float().label(f"v{i}") for i, name in enumerate(by_name)]
    rows = select(Metric.stage_index, Metric.split, Metric.step, *values).where(and_(*where)).subquery("x")
    bucketed = select(
        rows, func.ntile(max_points).over(partition_by=[rows.c.stage_index, rows.c.split],
                                          order_by=rows.c.step).label("bucket"),
    ).subquery("b")
    group = [bucketed.c.stage_index, bucketed.c.split, bucketed.c.bucket]
    last_steps = [func.max(case((bucketed.c[f"v{i}"].is_not(None), bucketed.c.step)))
                  .over(partition_by=group).label(f"l{i}") for i in range(len(by_name))]
    windowed = select(bucketed, *last_steps).subquery("w")
    aggregates: list[Any] = []
    for i in range(len(by_name)):
        value, last = windowed.c[f"v{i}"], windowed.c[f"l{i}"]
        aggregates += [func.max(last), func.max(case((windowed.c.step == last, value))),
                       func.min(value), func.max(value)]
    stmt = (select(windowed.c.stage_index, windowed.c.split, func.count().label("n"), *aggregates)
            .group_by(windowed.c.stage_index, windowed.c.split, windowed.c.bucket)
            .order_by(windowed.c.stage_index, windowed.c.split, windowed.c.bucket))
    present = {(s, sp, n) for s, sp, n in found}
    series: dict[tuple[int, str, str], MetricSeries] = {}
    for row in session.execute(stmt):
        stage_index, split_name, count = row[0], row[1], row[2]
        for i, name in enumerate(by_name):
            step, last, low, high = row[3 + 4 * i: 7 + 4 * i]
            if step is None or (stage_index, split_name, name) not in present:
                continue
            item = series.setdefault((stage_index, split_name, name), MetricSeries(
                name=name, stage_index=stage_index, split=split_name, points=[], downsampled=False))
            item.points.append([int(step), _float(last), _float(low), _float(high)])
            item.downsampled = item.downsampled or count > 1
    return MetricSeriesList(data=[series[key] for key in sorted(series)], columns=POINT_COLUMNS)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def run_progress(session: Session, run: Run) -> ProgressOut:
    """Returns where the run is (stage, step, total, fraction) and an ETA from its recent step times.

    The ETA covers the steps left in stages whose length is known (a stage's length is known once
    it starts); it is None until two train points of the current stage exist.
    """
    stages = run.stages
    current = next((s for s in stages if s.status == "running"), None)
    if current is None:
        current = next((s for s in stages if s.status != "succeeded"), stages[-1] if stages else None)
    done = sum(1.0 if s.status == "succeeded" else
               min(s.step / s.total_steps, 1.0) if s.total_steps else 0.0 for s in stages)
    fraction = 1.0 if run.status == "succeeded" else round(done / len(stages), 4) if stages else 0.0
    eta = None
    if current is not None and run.status in ("running", "cancelling") and current.total_steps:
        seconds_per_step = _recent_step_seconds(session, run.id, current.index)
        if seconds_per_step is not None:
            left = sum(max((s.total_steps or 0) - s.step, 0) for s in stages
                       if s.index >= current.index and s.status != "succeeded")
            eta = round(left * seconds_per_step, 1)
    return ProgressOut(
        stage=current.index if current else None, step=current.step if current else 0,
        total_steps=current.total_steps if current else None, fraction=fraction, eta_seconds=eta,
    )


def _recent_step_seconds(session: Session, run_id: str, stage_index: int) -> float | None:
    recent = (select(Metric.step, Metric.created_at)
              .where(Metric.run_id == run_id, Metric.stage_index == stage_index, Metric.split == "train")
              .order_by(Metric.step.desc()).limit(ETA_WINDOW).subquery())
    row = session.execute(select(func.max(recent.c.step), func.min(recent.c.step),
                                 func.max(recent.c.created_at), func.min(recent.c.created_at))).one()
    newest_step, oldest_step, newest_at, oldest_at = row
    if newest_step is None or newest_step == oldest_step or newest_at is None:
        return None
    return max((newest_at - oldest_at).total_seconds(), 0.0) / (newest_step - oldest_step)

