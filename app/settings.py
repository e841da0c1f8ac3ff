"""The one settings object of the service, read from `TUNEYARD_*` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEYARD_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path(".tuneyard"), description="root for the embedded database, broker and blobs")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite file in data_dir")
    broker_url: str | None = Field(None, description="Celery broker; default: kombu filesystem in data_dir")
    storage_dir: Path | None = Field(None, description="blob store root; default: data_dir/storage")
    base_models_dir: Path | None = Field(None, description="base model folders; default: data_dir/models")
    auth_enabled: bool = True
    auth_cache_seconds: float = Field(
        5.0, ge=0, description="an API key's team is cached this long per API process: a revoked key "
                               "stops working within it (0: look every key up)"
    )
    max_upload_bytes: int = Field(2 * 1024**3, ge=1024)
    env: str = Field("dev", pattern="^(dev|test|prod)$")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    heartbeat_seconds: float = Field(5.0, gt=0)
    lease_seconds: float = Field(60.0, gt=0, description="a run whose heartbeat is older is re-queued")
    queued_grace_seconds: float = Field(
        120.0, gt=0, description="a queued run unclaimed this long is re-sent"
    )
    max_attempts: int = Field(3, ge=1)
    reaper_interval_seconds: float = Field(10.0, gt=0)
    inference_backend: str = Field("local", pattern="^(local|sglang)$")
    sglang_url: str | None = None
    sglang_max_lora_rank: int = Field(
        64, ge=1, description="the SGLang server's --max-lora-rank: runs with a larger adapter.r are refused"
    )
    rollout_sglang_url: str | None = Field(
        None, description="an SGLang server (--enable-lora, same base) RL stages may sample on: "
        "rollout.engine 'sglang'"
    )
    worker_quantization: bool | None = Field(
        None, description="workers can load 4-bit bases (QLoRA); default: bitsandbytes is installed here"
    )
    inference_cache_bytes: int = Field(2 * 1024**3, ge=0)
    api_max_concurrency: int = Field(
        200, ge=1, description="requests the API serves at once; more get 503 (idle connections do not count)"
    )
    api_header_timeout_seconds: float = Field(
        10.0, gt=0, description="a connection that has not sent its request headers by then is closed"
    )
    api_body_timeout_seconds: float = Field(
        30.0, gt=0, description="a request body that stalls this long between chunks gets 408"
    )
    tmp_max_age_seconds: float = Field(
        6 * 3600.0, gt=0, description="temporary upload files older than this are swept (a killed upload)"
    )
    api_snapshot_seconds: float = Field(
        1.0, ge=0, description="a run's polled status and metrics are answered from a per-process cache "
                               "this long (a cancel or resume through this process drops it at once; 0: off)"
    )
    log_json: bool = False
    webhook_retry_base_seconds: float = Field(
        5.0, gt=0, description="first retry delay of a failed webhook delivery; doubles per attempt"
    )
    webhook_retry_max_seconds: float = Field(3600.0, gt=0, description="longest delay between two attempts")
    webhook_max_attempts: int = Field(12, ge=1, description="attempts before a delivery is marked failed")
    webhook_timeout_seconds: float = Field(10.0, gt=0, description="time a receiver has to answer")
    webhook_poll_seconds: float = Field(1.0, gt=0, description="how often the deliverer looks for due work")
    judge_base_url: str | None = Field(
        None, description="default endpoint of score_model graders; default: this server's own /v1"
    )
    judge_api_key: str | None = Field(None, description="API key workers send to the default judge endpoint")

    @field_validator("data_dir", "storage_dir", "base_models_dir")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        return v.expanduser().resolve() if v is not None else None

    @model_validator(mode="after")
    def _defaults_and_safety(self) -> Settings:
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.data_dir / 'tuneyard.db'}"
        if self.broker_url is None:
            self.broker_url = "filesystem://"
        if self.storage_dir is None:
            self.storage_dir = self.data_dir / "storage"
        if self.base_models_dir is None:
            self.base_models_dir = self.data_dir / "models"
        if self.env == "prod" and not self.auth_enabled:
            raise ValueError("auth_enabled=false is refused with env=prod")
        if self.inference_backend == "sglang" and not self.sglang_url:
            raise ValueError("inference_backend=sglang needs TUNEYARD_SGLANG_URL")
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def default_judge_url(self) -> str:
        """Returns the OpenAI-compatible root score_model graders use when they name no base_url."""
        return self.judge_base_url or f"http://{self.host}:{self.port}/v1"

    @property
    def broker_dir(self) -> Path:
        """Folder of the kombu filesystem transport (embedded mode)."""
        return self.data_dir / "broker"


@lru_cache
def get_settings() -> Settings:
    """Returns the process-wide settings, validated once."""
    return Settings()
