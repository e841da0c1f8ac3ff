"""Metric series and run progress as the API returns them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

MAX_POINTS = 10_000


class MetricSeries(BaseModel):
    """One metric of one stage and split; each point is `[step, value, min, max]` (see `columns`).

    Downsampled points stand for a bucket of consecutive steps: `step`/`value` are the bucket's
    last point, `min`/`max` the extremes inside it. Raw points have min == max == value.
    """

    object: Literal["metric.series"] = "metric.series"
    name: str
    stage_index: int
    split: str
    points: list[list[float | None]]
    downsampled: bool


class MetricSeriesList(BaseModel):
    object: Literal["list"] = "list"
    columns: list[str]
    data: list[MetricSeries]


class ProgressOut(BaseModel):
    """Where a run is: its current stage and step, the fraction of all stages done, and an ETA."""

    stage: int | None
    step: int
    total_steps: int | None
    fraction: float
    eta_seconds: float | None


class MetricsQuery(BaseModel):
    """The query of `GET /v1/runs/{run_id}/metrics` (one definition: the route validates with it, and
    so does the polled-reads lane in app.polled)."""

    stage: int | None = Field(None, ge=0)
    split: str | None = Field(None, max_length=20)
    names: str | None = Field(None, max_length=2000, description="comma-separated metric names")
    after_step: int | None = Field(None, ge=0)
    max_points: int = Field(1000, ge=2, le=MAX_POINTS)

    def wanted_names(self) -> tuple[str, ...] | None:
        wanted = tuple(n.strip() for n in self.names.split(",") if n.strip()) if self.names else ()
        return wanted or None
