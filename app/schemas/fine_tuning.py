"""OpenAI's fine-tuning API shapes: the job request, the job, its events and checkpoints.

Field names and literals follow the `openai` SDK's types (`openai.types.fine_tuning`). Every
hyperparameter takes a value or "auto"; `app.services.fine_tuning` resolves "auto" from the
training file's size once it is validated.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Auto = Literal["auto"]
JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(_Request):
    batch_size: Auto | int | None = Field(None, description="'auto' or ≥ 1")
    learning_rate_multiplier: Auto | float | None = Field(None, description="'auto' or > 0")
    n_epochs: Auto | int | None = Field(None, description="'auto' or 1..50")

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v: Any) -> Any:
        if isinstance(v, int) and not 1 <= v <= 256:
            raise ValueError("batch_size must be 'auto' or between 1 and 256")
        return v

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _multiplier(cls, v: Any) -> Any:
        if isinstance(v, float | int) and not 0 < v <= 100:
            raise ValueError("learning_rate_multiplier must be 'auto' or in (0, 100]")
        return v

    @field_validator("n_epochs")
    @classmethod
    def _epochs(cls, v: Any) -> Any:
        if isinstance(v, int) and not 1 <= v <= 50:
            raise ValueError("n_epochs must be 'auto' or between 1 and 50")
        return v


class DpoHyperparameters(Hyperparameters):
    beta: Auto | float | None = Field(None, description="'auto' (0.1) or > 0")

    @field_validator("beta")
    @classmethod
    def _beta(cls, v: Any) -> Any:
        if isinstance(v, float | int) and not 0 < v <= 2:
            raise ValueError("beta must be 'auto' or in (0, 2]")
        return v


class ReinforcementHyperparameters(Hyperparameters):
    # Accepted for compatibility and ignored (the job's events say so): Tuneyard's GRPO stage has
    # no compute budget knob, evaluates on the validation file every checkpoint, and trains models
    # without a reasoning-effort setting.
    compute_multiplier: Auto | float | None = None
    eval_interval: Auto | int | None = None
    eval_samples: Auto | int | None = None
    reasoning_effort: Literal["default", "low", "medium", "high"] | None = None


class SupervisedMethod(_Request):
    hyperparameters: Hyperparameters | None = None


class DpoMethod(_Request):
    hyperparameters: DpoHyperparameters | None = None


class ReinforcementMethod(_Request):
    grader: dict[str, Any]
    hyperparameters: ReinforcementHyperparameters | None = None


class Method(_Request):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: ReinforcementMethod | None = None

    @model_validator(mode="after")
    def _matches_type(self) -> Method:
        for other in ("supervised", "dpo", "reinforcement"):
            if other != self.type and getattr(self, other) is not None:
                raise ValueError(f"method.{other} is given but method.type is {self.type!r}")
        if self.type == "reinforcement" and self.reinforcement is None:
            raise ValueError("method.reinforcement with a grader is required for type 'reinforcement'")
        return self


class WandbSettings(_Request):
    project: str = Field(min_length=1, max_length=200)
    entity: str | None = Field(None, max_length=200)
    name: str | None = Field(None, max_length=200)
    tags: list[str] | None = None


class Integration(_Request):
    type: Literal["wandb"]
    wandb: WandbSettings


class JobCreate(_Request):
    model: str = Field(min_length=1, max_length=300)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(None, max_length=64)
    suffix: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9._-]*$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    integrations: list[Integration] | None = Field(None, max_length=8)
    method: Method | None = None
    hyperparameters: Hyperparameters | None = Field(
        None, description="deprecated by OpenAI in favour of method; read as method supervised")

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None:
            if len(v) > 16:
                raise ValueError("metadata holds at most 16 pairs")
            for key, value in v.items():
                if len(key) > 64 or len(value) > 512:
                    raise ValueError(f"metadata[{key[:64]!r}]: keys are at most 64 characters, values 512")
        return v

    @model_validator(mode="after")
    def _one_method(self) -> JobCreate:
        if self.method is not None and self.hyperparameters is not None:
            raise ValueError("give method (preferred) or the deprecated top-level hyperparameters, not both")
        return self


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobHyperparameters(BaseModel):
    batch_size: Auto | int | None = None
    learning_rate_multiplier: Auto | float | None = None
    n_epochs: Auto | int | None = None


class JobOut(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: JobHyperparameters
    model: str
    organization_id: str
    result_files: list[str] = []
    seed: int
    status: JobStatus
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    method: dict[str, Any]
    run_id: str | None = Field(None, description="Tuneyard: the run this job is (GET /v1/runs/{run_id})")


class JobEventOut(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"] = "message"
    data: dict[str, Any] | None = None


class CheckpointMetrics(BaseModel):
    step: float | None = None
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None


class JobCheckpointOut(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: CheckpointMetrics
