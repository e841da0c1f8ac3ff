"""Metric points: idempotent batched writes, series queries downsampled in SQL, run progress and ETA.

Downsampling is bucketed min/max/last: the step range of each (stage, split) is cut into at most
`max_points` equal-width step buckets, and every series gets one point per non-empty bucket — the
last step in the bucket where it has a value, that value, and the bucket's min and max, so spikes
stay visible. When the range fits, each step is its own bucket (no loss at all). Extraction from
the JSON column, bucketing and aggregation run in the database; the series names come from a
small catalog table kept by the writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

import orjson
from sqlalchemy import and_, func, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Metric, MetricSeriesName, Run, Team
from app.ids import is_id
from app.schemas.metrics import MetricSeriesList, ProgressOut
from app.services.owned import not_found
from app.services.snapshots import SnapshotCache, run_version

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
    """Writes points keyed by (run, stage, step, split); a point written again replaces the old values.

    The series catalog gets any (stage, split, name) it did not have in the same transaction. Both
    writes are statements compiled once per dialect and run with many parameter sets (a multi-row
    VALUES built per batch was compiled afresh every time: 2.3x slower, bench/README.md).
    """
    if not points:
        return
    # The last report of a key in one batch wins, as it would across batches.
    unique = {(p.stage_index, p.step, p.split): p for p in points}
    rows = [{"run_id": run_id, "stage_index": p.stage_index, "step": p.step, "split": p.split,
             "values": p.values, "created_at": p.created_at} for p in unique.values()]
    names = sorted({(p.stage_index, p.split, name) for p in unique.values() for name in p.values})
    metrics_upsert, catalog_insert = _upserts(session.get_bind().dialect.name)
    session.execute(metrics_upsert, rows)
    if names:
        session.execute(catalog_insert, [{"run_id": run_id, "stage_index": i, "split": split, "name": name}
                                         for i, split, name in names])


@cache
def _upserts(dialect: str) -> tuple[Any, Any]:
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    upsert = insert(Metric.__table__)
    upsert = upsert.on_conflict_do_update(
        index_elements=["run_id", "stage_index", "step", "split"],
        set_={"values": upsert.excluded["values"], "created_at": upsert.excluded.created_at},
    )
    return upsert, insert(MetricSeriesName.__table__).on_conflict_do_nothing()


def _filters(run_id: str, stage: int | None, split: str | None, after_step: int | None) -> list[Any]:
    where = [Metric.run_id == run_id]
    if stage is not None:
        where.append(Metric.stage_index == stage)
    if split is not None:
        where.append(Metric.split == split)
    if after_step is not None:
        where.append(Metric.step > after_step)
    return where


def series_names(session: Session, run_id: str, stage: int | None = None,
                 split: str | None = None) -> list[tuple[int, str, str]]:
    """Returns every (stage, split, name) the run has points for, from the series catalog."""
    stmt = select(MetricSeriesName.stage_index, MetricSeriesName.split, MetricSeriesName.name).where(
        MetricSeriesName.run_id == run_id)
    if stage is not None:
        stmt = stmt.where(MetricSeriesName.stage_index == stage)
    if split is not None:
        stmt = stmt.where(MetricSeriesName.split == split)
    return sorted((int(i), sp, n) for i, sp, n in session.execute(stmt))


def query_series(session: Session, run_id: str, *, stage: int | None = None, split: str | None = None,
                 names: list[str] | None = None, after_step: int | None = None,
                 max_points: int = 1000) -> MetricSeriesList:
    """Returns the run's metric series, each with at most `max_points` points (see the module doc)."""
    found = series_object(session, run_id, stage=stage, split=split, names=names, after_step=after_step,
                          max_points=max_points)
    return MetricSeriesList.model_validate_json(orjson.dumps(found))


def series_object(session: Session, run_id: str, *, stage: int | None = None, split: str | None = None,
                  names: list[str] | None = None, after_step: int | None = None,
                  max_points: int = 1000) -> dict[str, Any]:
    """Returns `query_series` as an object for `orjson.dumps` (no model on the way: a chart's first
    load is 13 series of 1,000 points; on PostgreSQL each series' points are JSON text already)."""
    found = series_names(session, run_id, stage, split)
    if names:
        wanted = set(names)
        found = [f for f in found if f[2] in wanted]
    groups: dict[tuple[int, str], list[str]] = {}
    for i, sp, name in found:
        groups.setdefault((i, sp), []).append(name)
    data: list[dict[str, Any]] = []
    for (stage_index, split_name), group_names in sorted(groups.items()):
        span = session.execute(select(func.min(Metric.step), func.max(Metric.step), func.count()).where(
            and_(*_filters(run_id, stage_index, split_name, after_step)))).one()
        low, high, count = span
        if not count:
            continue
        width = max(1, -(-(high - low + 1) // max_points))  # ceil: at most max_points buckets
        points = _bucket_points(session, run_id, stage_index, split_name, group_names, after_step, low, width)
        for name, (series_points, num_points) in zip(group_names, points, strict=True):
            if num_points:
                data.append({"object": "metric.series", "name": name, "stage_index": stage_index,
                             "split": split_name, "points": series_points, "downsampled": count > num_points})
    return {"object": "list", "columns": POINT_COLUMNS, "data": data}


async def metrics_json(sessions: sessionmaker[Session], cache: SnapshotCache, team: Team, run_id: str,
                       query: SeriesQuery) -> bytes:
    """Returns the JSON of `query_series` for the team's run, from the snapshot cache while the run
    has not moved (see app.services.snapshots) — a finished run's chart is computed once."""
    return await cache.answer(run_id, query, team.id,
                              lambda: _load_metrics_json(sessions, cache, team, run_id, query))


@dataclass(frozen=True)
class SeriesQuery:
    stage: int | None = None
    split: str | None = None
    names: tuple[str, ...] | None = None
    after_step: int | None = None
    max_points: int = 1000


def _load_metrics_json(sessions: sessionmaker[Session], cache: SnapshotCache, team: Team, run_id: str,
                       query: SeriesQuery) -> bytes:
    with sessions() as session:
        found = run_version(session, run_id) if is_id(run_id, "run") else None
        if found is None or found[0] != team.id:
            raise not_found(Run, run_id)
        cache.remember_owner(run_id, team.id)
        version = found[1]
        if (body := cache.stale(run_id, query, version)) is not None:
            return body
        series = series_object(session, run_id, stage=query.stage, split=query.split,
                               names=list(query.names) if query.names else None, after_step=query.after_step,
                               max_points=query.max_points)
    body = orjson.dumps(series)
    cache.put(run_id, query, body, version)
    return body


Points = list[list[float | None]] | orjson.Fragment  # a list, or the same list as JSON text


def _bucket_points(session: Session, run_id: str, stage: int, split: str, names: list[str],
                   after_step: int | None, low: int, width: int) -> list[tuple[Points, int]]:
    """Returns, per name, the [last step, last value, min, max] of each step bucket `[low + k·width, …)`
    and how many there are.

    PostgreSQL parses each row's JSON once (`json_to_record`), aggregates with a hash GROUP BY and
    writes each series' points as JSON itself: the API embeds the text as it is (parsing a
    thousand rows of arrays per series cost most of a first chart load). SQLite extracts with
    `json_extract`, finds each bucket's last value with a window, and the points are built here.
    """
    params: dict[str, Any] = {"run_id": run_id, "stage": stage, "split": split, "low": low, "width": width,
                              "after": after_step if after_step is not None else -1}
    where = "m.run_id = :run_id AND m.stage_index = :stage AND m.split = :split AND m.step > :after"
    bucket = "(m.step - :low) / :width"
    if session.get_bind().dialect.name == "postgresql":
        quoted = ['"' + name.replace('"', '""') + '"' for name in names]
        # max(ARRAY[step, value]) compares step first: the bucket's last [step, value], no sort.
        aggregates = ", ".join(f"max(ARRAY[m.step::float8, r.{q}]) FILTER (WHERE r.{q} IS NOT NULL) AS l{i}, "
                               f"min(r.{q}) AS n{i}, max(r.{q}) AS x{i}" for i, q in enumerate(quoted))
        record = ", ".join(f"{q} float8" for q in quoted)
        series = ", ".join(f"(json_agg(json_build_array(l{i}[1], l{i}[2], n{i}, x{i}) ORDER BY b) "
                           f"FILTER (WHERE l{i} IS NOT NULL))::text, count(l{i})" for i in range(len(names)))
        sql = (f"SELECT {series} FROM (SELECT {bucket} AS b, {aggregates} "
               f"FROM metrics m, json_to_record(m.\"values\") AS r({record}) "
               f"WHERE {where} GROUP BY b) AS buckets")
        row = session.execute(text(sql), params).one()
        # Numbers and nulls only: dropping json_agg's spaces leaves the same JSON, compact.
        return [(orjson.Fragment(points.replace(" ", "")) if points else [], count)
                for points, count in zip(row[::2], row[1::2], strict=True)]
    extract = ", ".join(f"json_extract(m.\"values\", :p{i}) AS v{i}" for i in range(len(names)))
    params.update({f"p{i}": '$."' + name.replace('"', '\\"') + '"' for i, name in enumerate(names)})
    lasts = ", ".join(f"max(CASE WHEN v{i} IS NOT NULL THEN step END) OVER (PARTITION BY b) AS l{i}"
                      for i in range(len(names)))
    aggregates = ", ".join(f"max(l{i}), max(CASE WHEN step = l{i} THEN v{i} END), min(v{i}), max(v{i})"
                           for i in range(len(names)))
    sql = (f"SELECT b, {aggregates} FROM (SELECT *, {lasts} FROM ("
           f"SELECT m.step, {bucket} AS b, {extract} FROM metrics m WHERE {where})) "
           "GROUP BY b ORDER BY b")
    out: list[list[list[float | None]]] = [[] for _ in names]
    for row in session.execute(text(sql), params):
        for i in range(len(names)):
            step, last, low_v, high_v = row[1 + 4 * i: 5 + 4 * i]
            if step is not None:
                out[i].append([int(step), _float(last), _float(low_v), _float(high_v)])
    return [(points, len(points)) for points in out]


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def run_progress(run: Run) -> ProgressOut:
    """Returns where the run is (stage, step, total, fraction) and an ETA from its recent step times.

    The ETA covers the steps left in stages whose length is known (a stage's length is known once
    it starts); it is None until the reporter measured the current stage's speed (two train points).
    """
    stages = run.stages
    current = next((s for s in stages if s.status == "running"), None)
    if current is None:
        current = next((s for s in stages if s.status != "succeeded"), stages[-1] if stages else None)
    done = sum(1.0 if s.status == "succeeded" else
               min(s.step / s.total_steps, 1.0) if s.total_steps else 0.0 for s in stages)
    fraction = 1.0 if run.status == "succeeded" else round(done / len(stages), 4) if stages else 0.0
    eta = None
    if (current is not None and run.status in ("running", "cancelling") and current.total_steps
            and current.seconds_per_step is not None):
        left = sum(max((s.total_steps or 0) - s.step, 0) for s in stages
                   if s.index >= current.index and s.status != "succeeded")
        eta = round(left * current.seconds_per_step, 1)
    return ProgressOut(
        stage=current.index if current else None, step=current.step if current else 0,
        total_steps=current.total_steps if current else None, fraction=fraction, eta_seconds=eta,
    )


def seconds_per_step(recent: list[tuple[int, datetime]]) -> float | None:
    """Returns the mean seconds per step over (step, reported at) points, None without two steps."""
    if len(recent) < 2:
        return None
    (first_step, first_at), (last_step, last_at) = min(recent), max(recent)
    if last_step == first_step:
        return None
    return max((last_at - first_at).total_seconds(), 0.0) / (last_step - first_step)
