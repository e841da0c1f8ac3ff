"""SQLAlchemy models: the database is the only source of truth for every state."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# Named constraints so Alembic batch mode on SQLite can drop/alter them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every database (SQLite hands back naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit id.
BIG_ID = BigInteger().with_variant(Integer, "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UTCDateTime()}


class Team(Base):
    __tablename__ = "teams"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    # sha256 of the whole key; the key itself is shown once and never stored.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(300))
    format: Mapped[str | None] = mapped_column(String(20))  # None until auto-detected
    status: Mapped[str] = mapped_column(String(20), default="validating")  # validating|ready|invalid
    num_records: Mapped[int | None]
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    blob_key: Mapped[str] = mapped_column(String(300))
    stats: Mapped[dict[str, Any]] = mapped_column(default=dict)
    errors: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    validated_at: Mapped[datetime | None]
    # When the reaper last sent the validation message again (a lost message or a dead worker).
    resent_at: Mapped[datetime | None]


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (
        UniqueConstraint("team_id", "idempotency_key", name="uq_runs_team_idempotency"),
        Index("ix_runs_status_heartbeat", "status", "heartbeat_at"),
    )
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    # queued|running|cancelling|succeeded|failed|cancelled — see app.jobs.states
    status: Mapped[str] = mapped_column(String(20), default="queued")
    base_model: Mapped[str] = mapped_column(String(300))
    spec: Mapped[dict[str, Any]]
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    # Fencing token: every claim increments it; writes carrying an older attempt are refused.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None]
    queued_at: Mapped[datetime | None] = mapped_column(default=utcnow)
    # When the reaper last re-sent the message of this queued period (None: not yet).
    resent_at: Mapped[datetime | None]
    error: Mapped[dict[str, Any] | None]
    # The fit estimate at submit (trainer_core.estimate.FitEstimate.as_dict); None when the base
    # model's config could not be read.
    estimate: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    stages: Mapped[list[RunStage]] = relationship(
        back_populates="run", order_by="RunStage.index", cascade="all, delete-orphan", lazy="selectin"
    )


class RunStage(Base):
    __tablename__ = "run_stages"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    method: Mapped[str] = mapped_column(String(20))
    # pending|running|succeeded|failed|cancelled
    status: Mapped[str] = mapped_column(String(20), default="pending")
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None]
    # Recent training speed (over the last ETA_WINDOW reported train steps), kept by the reporter:
    # a status request computes the ETA from the stage rows alone.
    seconds_per_step: Mapped[float | None] = mapped_column(Float)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    run: Mapped[Run] = relationship(back_populates="stages")


class Metric(Base):
    """One row per (run, stage, step, split): values of every metric at that step."""

    __tablename__ = "metrics"
    __table_args__ = (
        UniqueConstraint("run_id", "stage_index", "step", "split", name="uq_metrics_point"),
        # Series reads: one stage and split of a run in step order (the metrics API, downsampling).
        Index("ix_metrics_series", "run_id", "stage_index", "split", "step"),
    )
    id: Mapped[int] = mapped_column(BIG_ID, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    stage_index: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    split: Mapped[str] = mapped_column(String(20))
    values: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class MetricSeriesName(Base):
    """The catalog of a run's series: which metric names each (stage, split) has points for.

    Kept by the metric upsert, so listing a run's series reads a handful of rows instead of the
    keys of every point.
    """

    __tablename__ = "metric_series"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    stage_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    split: Mapped[str] = mapped_column(String(20), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), primary_key=True)


class Event(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(BIG_ID, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    kind: Mapped[str] = mapped_column(String(40))
    level: Mapped[str] = mapped_column(String(10), default="info")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (Index("ix_checkpoints_run_stage_step", "run_id", "stage_index", "step"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    stage_index: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(20))  # resume|adapter|merged|reward_model
    blob_prefix: Mapped[str] = mapped_column(String(400))  # storage key of the folder
    files: Mapped[list[Any]] = mapped_column(default=list)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    is_best: Mapped[bool] = mapped_column(Boolean, default=False)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None]


class Eval(Base):
    __tablename__ = "evals"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(20), default="queued")  # see app.jobs.states (EVAL_STATES)
    request: Mapped[dict[str, Any]]
    results: Mapped[dict[str, Any] | None]
    error: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    # The lease, as for runs: every claim increments `attempt` (the fencing token of its writes).
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None]
    queued_at: Mapped[datetime | None] = mapped_column(default=utcnow)
    resent_at: Mapped[datetime | None]


class FineTuningJob(Base):
    """An OpenAI-style fine-tuning job: a one-stage run plus the fields OpenAI's API has.

    While its files validate the job has no run (`status` = validating_files); once they are ready
    the run is created and the job's status is the run's (see app.services.fine_tuning). `status`
    holds only what no run can say: validating_files, started (a run exists), failed or cancelled
    before a run existed.
    """

    __tablename__ = "fine_tuning_jobs"
    __table_args__ = (Index("ix_fine_tuning_jobs_team_model", "team_id", "fine_tuned_model"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"), index=True)
    status: Mapped[str] = mapped_column(String(20), default="validating_files")
    model: Mapped[str] = mapped_column(String(300))
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40))
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    # The request's method with every "auto" resolved once the files are known.
    method: Mapped[dict[str, Any]]
    job_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata")
    integrations: Mapped[list[Any] | None]
    fine_tuned_model: Mapped[str] = mapped_column(String(400))
    # Set by pause, cleared by resume: the run stops like a cancel but the job reads `paused`.
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class WebhookEndpoint(Base):
    __tablename__ = "webhook_endpoints"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    url: Mapped[str] = mapped_column(String(2000))
    event_types: Mapped[list[Any]]
    # Kept in clear: signing an HMAC needs the secret itself (shown to the user once).
    secret: Mapped[str] = mapped_column(String(100))
    # After a rotation with keep_old_secret_active_for_24_hours, deliveries carry both signatures.
    previous_secret: Mapped[str | None] = mapped_column(String(100))
    previous_secret_expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookEvent(Base):
    """One event of the outbox, written in the transaction of the state change it reports.

    Its id is the `webhook-id` of every delivery of it, so a receiver can de-duplicate retries.
    """

    __tablename__ = "webhook_events"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    type: Mapped[str] = mapped_column(String(60))
    payload: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """One event to one endpoint: pending until a 2xx answer, retried with exponential backoff."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    event_id: Mapped[str] = mapped_column(ForeignKey("webhook_events.id", ondelete="CASCADE"), index=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"),
                                             index=True)
    status: Mapped[str] = mapped_column(String(20), default="pending")  # pending|delivered|failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    # A deliverer holds a delivery until this time; one that died mid-request lets it go this way.
    locked_until: Mapped[datetime | None]
    last_status_code: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDeliveryAttempt(Base):
    __tablename__ = "webhook_delivery_attempts"
    id: Mapped[int] = mapped_column(BIG_ID, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id", ondelete="CASCADE"),
                                             index=True)
    number: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    duration_ms: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(Text)


class WorkerHost(Base):
    """A training worker and the devices it offers, kept fresh by its heartbeat."""

    __tablename__ = "workers"
    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # the Celery node name
    device_kind: Mapped[str] = mapped_column(String(10))  # cuda|cpu
    device_count: Mapped[int] = mapped_column(Integer)
    memory_per_device_bytes: Mapped[int] = mapped_column(BigInteger)
    device_name: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
