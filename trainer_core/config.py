"""Typed configuration of a training run: adapter, stages, teachers (reward specs: reward_config.py).

These models are the contract between the API and the trainer: the API validates a submitted run
spec with exactly these classes and the trainer runs what they describe. This module must import
without torch (the API imports it on the request path).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from trainer_core.grader_config import StageReward
from trainer_core.reward_config import ExactMatchReward

DatasetFormat = Literal["sft", "preference", "prompts", "trajectories"]
Method = Literal["sft", "dpo", "ppo", "grpo", "sad"]

# Which dataset formats each stage method can train on.
METHOD_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": ("sft", "trajectories"),
    "dpo": ("preference",),
    "ppo": ("prompts",),
    "grpo": ("prompts",),
    "sad": ("trajectories",),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- adapter


class LoraAdapter(_Strict):
    type: Literal["lora"] = "lora"
    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("target_modules must name at least one module or be 'all-linear'")
        return v


class FullAdapter(_Strict):
    """Full fine-tuning: every weight trains and the export is a merged model only."""

    type: Literal["full"] = "full"


Adapter = Annotated[LoraAdapter | FullAdapter, Field(discriminator="type")]


# ---------------------------------------------------------------- stages


class DatasetRef(_Strict):
    id: str = Field(min_length=1)
    weight: float = Field(1.0, gt=0)


class PromptCurriculum(_Strict):
    """Admit harder prompts (records carry an integer `difficulty`) once the success rate passes a bar."""

    threshold: float = Field(0.7, gt=0, le=1)
    window: int = Field(32, ge=1, description="recent prompts over which the success rate is measured")
    start_level: int = 0


# Stage defaults are LoRA rates (common LoRA recipes: SFT 2e-4, DPO 5e-6, RL 5e-6 to 1e-5). Full
# fine-tuning moves every weight: a stage that leaves learning_rate unset gets these 10x lower rates.
FULL_FINETUNE_LEARNING_RATES: dict[str, float] = {
    "sft": 2e-5, "dpo": 5e-7, "ppo": 1e-6, "grpo": 5e-7, "sad": 2e-5,
}
LEARNING_RATE_NOTE = "default: the method's LoRA rate; with adapter.type 'full', FULL_FINETUNE_LEARNING_RATES"


class StageBase(_Strict):
    datasets: list[DatasetRef] = Field(min_length=1)
    eval_dataset: str | None = None
    eval_fraction: float = Field(0.0, ge=0, le=0.5, description="held-out share of the training mixture")
    epochs: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, ge=1)
    learning_rate: float = Field(2e-4, gt=0, le=1, description=LEARNING_RATE_NOTE)
    batch_size: int = Field(8, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    max_seq_len: int = Field(2048, ge=8)
    truncation: Literal["right", "left", "drop"] = "right"
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    eval_every_steps: int | None = Field(None, ge=1)

    @field_validator("max_steps")
    @classmethod
    def _one_length(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and info.data.get("epochs") is not None:
            raise ValueError("give epochs or max_steps, not both")
        return v

    @field_validator("warmup_steps")
    @classmethod
    def _warmup_within_stage(cls, v: int, info: ValidationInfo) -> int:
        max_steps = info.data.get("max_steps")
        if max_steps is not None and v >= max_steps:
            raise ValueError(
                f"warmup_steps ({v}) must be below max_steps ({max_steps}): the rate would never leave warmup"
            )
        return v

    @field_validator("eval_every_steps")
    @classmethod
    def _has_eval_data(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("eval_fraction") and info.data.get("eval_dataset") is None:
            raise ValueError(
                "eval_every_steps needs eval data: set eval_fraction > 0 (held out from the training "
                "mixture) or eval_dataset"
            )
        return v

    @model_validator(mode="after")
    def _default_length(self) -> StageBase:
        # "Every stage takes epochs or max_steps": one epoch when neither is given.
        if self.epochs is None and self.max_steps is None:
            object.__setattr__(self, "epochs", 1.0)
        return self


class SFTStage(StageBase):
    method: Literal["sft"]
    packing: bool = True


class DPOStage(StageBase):
    method: Literal["dpo"]
    learning_rate: float = Field(5e-6, gt=0, le=1, description=LEARNING_RATE_NOTE)
    beta: float = Field(0.1, gt=0)
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)

    @field_validator("label_smoothing")
    @classmethod
    def _smoothing_is_sigmoid_only(cls, v: float, info: ValidationInfo) -> float:
        if v and info.data.get("loss_type") == "ipo":
            raise ValueError("label_smoothing applies to loss_type 'sigmoid' only (cDPO); IPO has none")
        return v


class _RolloutStage(StageBase):
    reward: StageReward = Field(
        default_factory=lambda: ExactMatchReward(type="exact_match"),
        description="a Tuneyard reward spec (exact_match ... combined) or a grader (string_check ... multi)",
    )
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    curriculum: PromptCurriculum | None = None

    @field_validator("max_new_tokens")
    @classmethod
    def _prompt_fits(cls, v: int, info: ValidationInfo) -> int:
        max_seq_len = info.data.get("max_seq_len")
        if max_seq_len is not None and v >= max_seq_len:
            raise ValueError(
                f"max_new_tokens ({v}) must be below max_seq_len ({max_seq_len}): prompt and completion "
                "share max_seq_len, and the prompt keeps its last max_seq_len - max_new_tokens tokens"
            )
        return v


class GRPOStage(_RolloutStage):
    method: Literal["grpo"]
    learning_rate: float = Field(5e-6, gt=0, le=1, description=LEARNING_RATE_NOTE)
    num_generations: int = Field(8, ge=2)
    epsilon: float = Field(0.2, gt=0, lt=1)
    epsilon_high: float | None = Field(None, gt=0)
    beta: float = Field(0.0, ge=0, description="KL coefficient; 0 skips the reference forward")
    loss_aggregation: Literal["grpo", "dapo"] = "grpo"
    advantage_scaling: Literal["group", "batch", "none"] = "group"

    @field_validator("num_generations")
    @classmethod
    def _batch_divisible(cls, v: int, info: ValidationInfo) -> int:
        batch_size = info.data.get("batch_size")
        if batch_size is not None and batch_size % v:
            raise ValueError(
                f"batch_size ({batch_size}) must be divisible by num_generations ({v}): each batch "
                "holds whole groups of completions"
            )
        return v


class PPOStage(_RolloutStage):
    method: Literal["ppo"]
    learning_rate: float = Field(1e-5, gt=0, le=1, description=LEARNING_RATE_NOTE)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    vf_coef: float = Field(0.1, ge=0)
    kl_coef: float = Field(0.05, ge=0)
    cliprange: float = Field(0.2, gt=0, lt=1)
    cliprange_value: float = Field(0.2, gt=0)
    ppo_epochs: int = Field(4, ge=1)
    whiten_advantages: bool = True


class SpanWeights(_Strict):
    """Loss weight per span type; observation and other spans never carry loss."""

    reasoning: float = Field(1.0, ge=0)
    action: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _some_weight(self) -> SpanWeights:
        if self.reasoning == 0 and self.action == 0:
            raise ValueError("at least one of reasoning/action must have a positive weight")
        return self


class SpanMarkers(_Strict):
    """Line-start markers that open each span type in text trajectories."""

    reasoning: list[str] = ["Thought:", "Reasoning:"]
    action: list[str] = ["Action:", "Answer:", "Final Answer:"]
    observation: list[str] = ["Observation:"]
    think_tags: tuple[str, str] | None = ("<think>", "</think>")


class TeacherSpec(_Strict):
    """Where the teacher distribution comes from.

    `dataset`: top-k log-probs stored in each trajectory record (none stored → cross-entropy).
    `model`: computed online by a local model — a base model name or a finished checkpoint id.
    `sglang`: prompt top-k log-probs from an SGLang server at `url`.
    """

    source: Literal["dataset", "model", "sglang"] = "dataset"
    model: str | None = None
    url: str | None = None
    top_k: int = Field(20, ge=1, le=1000)

    @model_validator(mode="after")
    def _needs_target(self) -> TeacherSpec:
        if self.source == "model" and not self.model:
            raise ValueError("teacher.model is required when teacher.source is 'model'")
        if self.source == "sglang" and not self.url:
            raise ValueError("teacher.url is required when teacher.source is 'sglang'")
        return self


class SADStage(StageBase):
    method: Literal["sad"]
    teacher: TeacherSpec = TeacherSpec()
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "symmetric_kl", "alpha", "ce"] = "forward_kl"
    jsd_beta: float = Field(0.5, ge=0, le=1)
    alpha: float = Field(0.5, gt=0, lt=1)
    temperature: float = Field(1.0, gt=0)
    tail_bucket: bool = True
    weighting: Literal["uniform", "span_type", "confidence", "scheduled"] = "span_type"
    span_weights: SpanWeights = SpanWeights()
    span_weights_end: SpanWeights | None = Field(
        None, description="with weighting='scheduled': weights at the end of the stage"
    )
    markers: SpanMarkers = SpanMarkers()
    curriculum: bool = False

    @model_validator(mode="after")
    def _schedule_has_end(self) -> SADStage:
        if self.weighting == "scheduled" and self.span_weights_end is None:
            raise ValueError("weighting 'scheduled' needs span_weights_end")
        return self


Stage = Annotated[
    SFTStage | DPOStage | PPOStage | GRPOStage | SADStage, Field(discriminator="method")
]


# ---------------------------------------------------------------- run


class WandbIntegration(_Strict):
    project: str = "tuneyard"
    entity: str | None = None
    mode: Literal["online", "offline"] = "offline"


class MlflowIntegration(_Strict):
    tracking_uri: str | None = None
    experiment: str = "tuneyard"


class Integrations(_Strict):
    wandb: WandbIntegration | None = None
    mlflow: MlflowIntegration | None = None


class RunSpec(_Strict):
    name: str | None = Field(None, max_length=200)
    base_model: str = Field(min_length=1)
    adapter: Adapter = LoraAdapter()
    seed: int = 0
    stages: list[Stage] = Field(min_length=1, max_length=16)
    checkpoint_every_steps: int | None = Field(200, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    export: list[Literal["adapter", "merged"]] = ["adapter"]
    integrations: Integrations = Integrations()

    @model_validator(mode="after")
    def _full_finetune_rates(self) -> RunSpec:
        if isinstance(self.adapter, FullAdapter):
            # Only rates the user left unset; a dumped spec states its rates, so this runs once.
            stages = [
                stage if "learning_rate" in stage.model_fields_set
                else stage.model_copy(update={"learning_rate": FULL_FINETUNE_LEARNING_RATES[stage.method]})
                for stage in self.stages
            ]
            object.__setattr__(self, "stages", stages)
        return self

    @model_validator(mode="after")
    def _export_matches_adapter(self) -> RunSpec:
        if isinstance(self.adapter, FullAdapter) and "adapter" in self.export:
            raise ValueError("export 'adapter' needs adapter.type 'lora'; full fine-tuning exports 'merged'")
        if not self.export:
            raise ValueError("export must name at least one of 'adapter', 'merged'")
        return self

    def dataset_ids(self) -> set[str]:
        """Returns every dataset id the spec reads (training and eval)."""
        ids: set[str] = set()
        for stage in self.stages:
            ids.update(ref.id for ref in stage.datasets)
            if stage.eval_dataset:
                ids.add(stage.eval_dataset)
        return ids
