"""Typed configuration of a training run: adapter, stages, teachers (reward specs: reward_config.py),
and the sampling parameters serving, evals and the decoder share.

These models are the contract between the API and the trainer: the API validates a submitted run
spec with exactly these classes and the trainer runs what they describe. This module must import
without torch (the API imports it on the request path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from trainer_core.grader_config import StageReward
from trainer_core.reward_config import ExactMatchReward
from trainer_core.spec_base import (
    MAX_ACCUMULATION,
    MAX_BATCH,
    MAX_BATCH_TOKENS,
    MAX_COEF,
    MAX_EPOCHS,
    MAX_GENERATIONS,
    MAX_LIST,
    MAX_NEW_TOKENS,
    MAX_SEED,
    MAX_SEQ_LEN,
    MAX_STEPS,
    MAX_WEIGHT,
    SpecModel,
)

DatasetFormat = Literal["sft", "preference", "prompts", "trajectories"]

# Which dataset formats each stage method can train on.
METHOD_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": ("sft", "trajectories"),
    "dpo": ("preference",),
    "ppo": ("prompts",),
    "grpo": ("prompts",),
    "sad": ("trajectories",),
    "reward_model": ("preference",),
}


# ---------------------------------------------------------------- adapter


class LoraAdapter(SpecModel):
    type: Literal["lora"] = Field("lora", description="LoRA: low-rank adapters on the frozen base model")
    r: int = Field(16, ge=1, le=1024, description="rank of each adapter matrix")
    alpha: float = Field(
        32, gt=0,
        le=MAX_COEF * 100, description="scaling numerator: the adapter's update is scaled by alpha / r",
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter's input during training")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear",
        max_length=MAX_LIST,
        description="module names to adapt, or 'all-linear' for every linear layer but the LM head",
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("target_modules must name at least one module or be 'all-linear'")
        return v


class QLoraAdapter(LoraAdapter):
    """LoRA over a base quantised to 4 bits with bitsandbytes (QLoRA, arXiv 2305.14314).

    The adapter trains in fp32 (bf16 autocast on CUDA) over the frozen 4-bit base. Exports: the
    adapter (loads over the ordinary bf16/fp32 base) and a merged model whose base weights are the
    dequantised 4-bit ones the adapter was trained against (the manifest's ``merged_base`` says so).
    """

    type: Literal["qlora"] = Field(  # type: ignore[assignment]
        "qlora", description="LoRA over a 4-bit (bitsandbytes) base: QLoRA"
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base")
    double_quant: bool = Field(True, description="quantise the quantisation constants too (~0.4 bit/param)")


class FullAdapter(SpecModel):
    """Full fine-tuning: every weight trains and the export is a merged model only."""

    type: Literal["full"] = Field("full", description="full fine-tuning: every weight trains")


Adapter = Annotated[LoraAdapter | QLoraAdapter | FullAdapter, Field(discriminator="type")]


# ---------------------------------------------------------------- stages


class DatasetRef(SpecModel):
    id: str = Field(min_length=1, max_length=200, description="id of an uploaded dataset")
    weight: float = Field(
        1.0, gt=0,
        le=MAX_WEIGHT,
        description="share of the stage's training mixture, relative to the other datasets' weights",
    )


class PromptCurriculum(SpecModel):
    """Admit harder prompts (records carry an integer `difficulty`) once the success rate passes a bar."""

    threshold: float = Field(
        0.7, gt=0, le=1,
        description="success rate over the window that admits the next difficulty level",
    )
    window: int = Field(
        32, ge=1, le=100_000,
        description="recent prompts over which the success rate is measured",
    )
    start_level: int = Field(
        0, ge=-1_000_000, le=1_000_000,
        description="the highest difficulty admitted at the start",
    )


# Stage defaults are LoRA rates (common LoRA recipes: SFT 2e-4, DPO 5e-6, RL 5e-6 to 1e-5). Full
# fine-tuning moves every weight: a stage that leaves learning_rate unset gets these 10x lower rates.
FULL_FINETUNE_LEARNING_RATES: dict[str, float] = {
    "sft": 2e-5, "dpo": 5e-7, "ppo": 1e-6, "grpo": 5e-7, "sad": 2e-5, "reward_model": 1e-5,
}
LEARNING_RATE_NOTE = "default: the method's LoRA rate; with adapter.type 'full', FULL_FINETUNE_LEARNING_RATES"


class StageBase(SpecModel):
    datasets: list[DatasetRef] = Field(
        min_length=1, max_length=MAX_LIST,
        description="training datasets, mixed by weight",
    )
    eval_dataset: str | None = Field(
        None,
        max_length=200, description="id of a held-out dataset to evaluate on (instead of eval_fraction)",
    )
    eval_fraction: float = Field(0.0, ge=0, le=0.5, description="held-out share of the training mixture")
    epochs: float | None = Field(
        None, gt=0,
        le=MAX_EPOCHS,
        description="passes over the training data (give epochs or max_steps; default: 1 epoch)",
    )
    max_steps: int | None = Field(
        None, ge=1, le=MAX_STEPS,
        description="optimizer steps of the stage (instead of epochs)",
    )
    learning_rate: float = Field(2e-4, gt=0, le=1, description=LEARNING_RATE_NOTE)
    batch_size: int = Field(
        8, ge=1,
        le=MAX_BATCH,
        description="examples per micro-batch (pairs for DPO, completions for GRPO, prompts for PPO)",
    )
    gradient_accumulation: int = Field(
        1, ge=1, le=MAX_ACCUMULATION,
        description="micro-batches per optimizer step",
    )
    max_seq_len: int = Field(
        2048, ge=8,
        le=MAX_SEQ_LEN,
        description="longest sequence in tokens; longer examples are truncated per `truncation`",
    )
    truncation: Literal["right", "left", "drop"] = Field(
        "right",
        description="how an over-long example is cut: keep its start (right), its end (left), or drop it",
    )
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine",
        description="learning-rate decay after warmup",
    )
    warmup_steps: int = Field(
        0, ge=0, le=MAX_STEPS,
        description="optimizer steps of linear learning-rate warmup",
    )
    weight_decay: float = Field(
        0.0, ge=0,
        le=MAX_COEF, description="AdamW weight decay (biases and norm weights take none)",
    )
    max_grad_norm: float | None = Field(
        1.0, gt=0,
        le=MAX_COEF * 100, description="gradient-norm clipping threshold; null turns clipping off",
    )
    eval_every_steps: int | None = Field(
        None, ge=1,
        le=MAX_STEPS, description="evaluate every N optimizer steps (and at the end); needs eval data",
    )

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

    @model_validator(mode="after")
    def _micro_batch_fits(self) -> StageBase:
        # Each bound alone still allows a micro-batch no worker holds (4,096 x 131,072 tokens).
        tokens = self.batch_size * self.max_seq_len
        if tokens > MAX_BATCH_TOKENS:
            raise ValueError(
                f"batch_size x max_seq_len is {tokens} tokens per micro-batch, over the limit of "
                f"{MAX_BATCH_TOKENS}: lower batch_size (raise gradient_accumulation to keep the "
                "effective batch) or max_seq_len")
        return self


class SFTStage(StageBase):
    method: Literal["sft"] = Field(description="supervised fine-tuning on sft or trajectories records")
    packing: bool = Field(
        True,
        description="pack examples into rows (block-diagonal attention); else length-grouped, padded",
    )


class DPOStage(StageBase):
    method: Literal["dpo"] = Field(description="direct preference optimisation on preference records")
    learning_rate: float = Field(5e-6, gt=0, le=1, description=LEARNING_RATE_NOTE)
    beta: float = Field(
        0.1, gt=0, le=MAX_COEF,
        description="strength of the implicit KL to the stage-start reference",
    )
    loss_type: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="sigmoid (DPO) or ipo (on log-probs averaged over completion tokens)"
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5,
        description="assumed share of flipped preference labels (cDPO; sigmoid only)",
    )
    disable_dropout: bool = Field(
        True, description="train the policy without dropout, as the reference runs (TRL's default)"
    )

    @field_validator("label_smoothing")
    @classmethod
    def _smoothing_is_sigmoid_only(cls, v: float, info: ValidationInfo) -> float:
        if v and info.data.get("loss_type") == "ipo":
            raise ValueError("label_smoothing applies to loss_type 'sigmoid' only (cDPO); IPO has none")
        return v


class RewardModelStage(StageBase):
    """A reward model: the base architecture + scalar head, trained with Bradley-Terry on preference pairs.

    Its model scores sequences; it is not a policy a later stage could continue, so it is the only
    stage of its run, which exports a ``reward_model`` checkpoint for ``reward_model`` graders.
    """

    method: Literal["reward_model"] = Field(
        description="a reward model (scalar head, Bradley-Terry) on preference records"
    )
    learning_rate: float = Field(1e-4, gt=0, le=1, description=LEARNING_RATE_NOTE)
    disable_dropout: bool = Field(True, description="train without dropout (TRL's default)")


class RolloutSpec(SpecModel):
    """Which engine samples a GRPO/PPO stage's completions (``trainer_core.rollout_engines``).

    `local`: the in-process sampler (runs anywhere); `paged`: transformers continuous batching with
    a paged KV cache in the training process; `sglang`: the deployment's SGLang server for
    rollouts, with the policy adapter reloaded after each optimizer step. The loss recomputes
    log-probs with the policy; for `paged` and `sglang` each token is weighted by the truncated
    importance ratio min(pi_train / pi_engine, tis_cap).
    """

    engine: Literal["local", "paged", "sglang"] = Field("local", description="what samples the rollouts")
    tis_cap: float = Field(2.0, ge=1, le=100, description="truncation C of the importance weight (TRL: 2)")


class _RolloutStage(StageBase):
    rollout: RolloutSpec = Field(RolloutSpec(), description="the engine that samples completions")
    reward: StageReward = Field(
        default_factory=lambda: ExactMatchReward(type="exact_match"),
        description="a Tuneyard reward spec (exact_match ... combined) or a grader (string_check ... multi)",
    )
    max_new_tokens: int = Field(
        256, ge=1,
        le=MAX_NEW_TOKENS, description="most tokens sampled per completion (below max_seq_len)",
    )
    temperature: float = Field(1.0, gt=0, le=MAX_COEF, description="sampling temperature of rollouts")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass of rollouts")
    curriculum: PromptCurriculum | None = Field(
        None,
        description="admit harder prompts (by their `difficulty`) as the success rate rises",
    )

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
    method: Literal["grpo"] = Field(description="group relative policy optimisation on prompts records")
    learning_rate: float = Field(5e-6, gt=0, le=1, description=LEARNING_RATE_NOTE)
    num_generations: int = Field(
        8, ge=2,
        le=MAX_GENERATIONS, description="completions sampled per prompt (a group); divides batch_size",
    )
    epsilon: float = Field(0.2, gt=0, lt=1, description="lower clip range of the probability ratio")
    epsilon_high: float | None = Field(
        None, gt=0,
        le=MAX_COEF, description="upper clip range (DAPO's clip-higher); default: epsilon",
    )
    beta: float = Field(0.0, ge=0, le=MAX_COEF, description="KL coefficient; 0 skips the reference forward")
    loss_aggregation: Literal["grpo", "dapo"] = Field(
        "grpo",
        description="grpo: mean per sequence, then over sequences; dapo: mean over all tokens",
    )
    advantage_scaling: Literal["group", "batch", "none"] = Field(
        "group",
        description="divide advantages by the group's or the batch's reward std, or not at all",
    )

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
    method: Literal["ppo"] = Field(
        description="proximal policy optimisation with a value head on prompts records",
    )
    learning_rate: float = Field(1e-5, gt=0, le=1, description=LEARNING_RATE_NOTE)
    gamma: float = Field(1.0, ge=0, le=1, description="discount factor of GAE")
    lam: float = Field(0.95, ge=0, le=1, description="lambda of GAE")
    vf_coef: float = Field(0.1, ge=0, le=MAX_COEF, description="weight of the value loss")
    kl_coef: float = Field(
        0.05, ge=0,
        le=MAX_COEF, description="per-token KL penalty to the stage-start reference, in the reward",
    )
    cliprange: float = Field(0.2, gt=0, lt=1, description="clip range of the probability ratio")
    cliprange_value: float = Field(0.2, gt=0, le=MAX_COEF, description="clip range of the value update")
    ppo_epochs: int = Field(
        4, ge=1, le=64,
        description="optimizer steps (epochs over the rollout) per rollout",
    )
    whiten_advantages: bool = Field(True, description="normalise advantages to zero mean and unit variance")


class SpanWeights(SpecModel):
    """Loss weight per span type; observation and other spans never carry loss."""

    reasoning: float = Field(1.0, ge=0, le=MAX_WEIGHT, description="loss weight of reasoning tokens")
    action: float = Field(1.0, ge=0, le=MAX_WEIGHT, description="loss weight of action tokens")

    @model_validator(mode="after")
    def _some_weight(self) -> SpanWeights:
        if self.reasoning == 0 and self.action == 0:
            raise ValueError("at least one of reasoning/action must have a positive weight")
        return self


class SpanMarkers(SpecModel):
    """Line-start markers that open each span type in text trajectories."""

    reasoning: list[str] = Field(
        ["Thought:", "Reasoning:"],
        max_length=MAX_LIST, description="line-start markers that open a reasoning span",
    )
    action: list[str] = Field(
        ["Action:", "Answer:", "Final Answer:"],
        max_length=MAX_LIST, description="line-start markers that open an action span",
    )
    observation: list[str] = Field(
        ["Observation:"],
        max_length=MAX_LIST, description="line-start markers that open an observation span (never trained)",
    )
    think_tags: tuple[str, str] | None = Field(
        ("<think>", "</think>"),
        description="opening and closing tags of inline reasoning; null: none",
    )


class TeacherSpec(SpecModel):
    """Where the teacher distribution comes from.

    `dataset`: top-k log-probs stored in each trajectory record (none stored → cross-entropy).
    `model`: computed online by a local model — a base model name or a finished checkpoint id.
    `sglang`: prompt top-k log-probs from an SGLang server at `url`.
    """

    source: Literal["dataset", "model", "sglang"] = Field(
        "dataset",
        description="dataset (stored top-k log-probs), model (a local model) or sglang (a server)",
    )
    model: str | None = Field(
        None,
        max_length=400, description="with source 'model': a base model name or a finished checkpoint id",
    )
    url: str | None = Field(None, max_length=2000, description="with source 'sglang': the server's base URL")
    top_k: int = Field(20, ge=1, le=1000, description="teacher log-probs kept per position")

    @model_validator(mode="after")
    def _needs_target(self) -> TeacherSpec:
        if self.source == "model" and not self.model:
            raise ValueError("teacher.model is required when teacher.source is 'model'")
        if self.source == "sglang" and not self.url:
            raise ValueError("teacher.url is required when teacher.source is 'sglang'")
        return self


class SADStage(StageBase):
    method: Literal["sad"] = Field(description="structured agent distillation on trajectories records")
    teacher: TeacherSpec = Field(TeacherSpec(), description="where the teacher distribution comes from")
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "symmetric_kl", "alpha", "ce"] = Field(
        "forward_kl",
        description="divergence between teacher and student; ce: cross-entropy on the trajectory's tokens",
    )
    jsd_beta: float = Field(
        0.5, ge=0, le=1,
        description="with divergence 'jsd': the mixture weight of the generalised JSD",
    )
    alpha: float = Field(
        0.5, gt=0, lt=1,
        description="with divergence 'alpha': the alpha of the alpha-divergence",
    )
    temperature: float = Field(
        1.0, gt=0, le=MAX_COEF,
        description="softmax temperature applied to teacher and student",
    )
    tail_bucket: bool = Field(
        True,
        description="give the probability mass outside the teacher's top-k one shared bucket",
    )
    weighting: Literal["uniform", "span_type", "confidence", "scheduled"] = Field(
        "span_type",
        description="per-token loss weights: uniform, by span type, by teacher confidence, or scheduled",
    )
    span_weights: SpanWeights = Field(SpanWeights(), description="loss weight per span type")
    span_weights_end: SpanWeights | None = Field(
        None, description="with weighting='scheduled': weights at the end of the stage"
    )
    markers: SpanMarkers = Field(SpanMarkers(), description="how spans are found in text trajectories")
    curriculum: bool = Field(
        False,
        description="train on simple trajectories (fewer steps, then fewer tokens) first",
    )

    @model_validator(mode="after")
    def _schedule_has_end(self) -> SADStage:
        if self.weighting == "scheduled" and self.span_weights_end is None:
            raise ValueError("weighting 'scheduled' needs span_weights_end")
        return self


Stage = Annotated[
    SFTStage | DPOStage | PPOStage | GRPOStage | SADStage | RewardModelStage, Field(discriminator="method")
]


# ---------------------------------------------------------------- sampling (serving, evals, decoding)


class SamplingParams(SpecModel):
    """How to pick tokens and when to stop, with OpenAI's names (``temperature`` 0 is greedy).

    The one sampling type of the service: the inference backends, eval jobs and trainer_core's
    decoder all take it.
    """

    max_tokens: int = Field(16, ge=1, le=32768, description="most tokens to generate")
    temperature: float = Field(1.0, ge=0, le=2, description="softmax temperature; 0 picks the likeliest")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: the smallest set with this mass")
    stop: tuple[str, ...] = Field((), max_length=4, description="strings that end the completion (left out)")
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED,
        description="seed of the sampling generator; none draws fresh entropy",
    )
    n: int = Field(1, ge=1, le=16, description="completions per prompt")
    logprobs: bool = Field(False, description="report each generated token's log-probability")
    top_logprobs: int = Field(0, ge=0, le=20, description="with logprobs: likeliest alternatives per token")

    def for_sample(self, index: int) -> SamplingParams:
        """Returns the parameters of sample ``index`` of a request: seed + index when seeded, so the
        samples differ and the request stays reproducible."""
        return self if self.seed is None else self.model_copy(update={"seed": self.seed + index})


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's text and log-prob, with the likeliest alternatives as ``(token, logprob)``."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


# ---------------------------------------------------------------- run


class WandbIntegration(SpecModel):
    project: str = Field("tuneyard", max_length=200, description="Weights & Biases project")
    entity: str | None = Field(
        None, max_length=200,
        description="Weights & Biases team or user; default: the account's default entity"
    )
    mode: Literal["online", "offline"] = Field(
        "offline",
        description="online logs to the server; offline writes local files",
    )


class MlflowIntegration(SpecModel):
    tracking_uri: str | None = Field(
        None, max_length=2000,
        description="MLflow tracking server; default: a local SQLite store in the run's folder"
    )
    experiment: str = Field("tuneyard", max_length=200, description="MLflow experiment name")


class Integrations(SpecModel):
    wandb: WandbIntegration | None = Field(None, description="log metrics to Weights & Biases")
    mlflow: MlflowIntegration | None = Field(None, description="log metrics to MLflow")


# Stage methods that train on several devices (FSDP2 over torchrun); the rollout methods and SAD's
# teachers run on one device for now.
DISTRIBUTED_METHODS = ("sft", "dpo")


class Resources(SpecModel):
    """What one run needs from a worker."""

    gpus: int = Field(1, ge=1, le=64, description="devices the run trains on; > 1 shards it with FSDP2")


class RunSpec(SpecModel):
    name: str | None = Field(None, max_length=200, description="a name for the run")
    base_model: str = Field(
        min_length=1,
        max_length=400, description="a base model name, or a checkpoint id to continue from",
    )
    adapter: Adapter = Field(
        LoraAdapter(),
        description="what trains: a LoRA adapter (default), LoRA over a 4-bit base, or every weight",
    )
    gradient_checkpointing: bool | None = Field(
        None, description="recompute activations in the backward pass (non-reentrant); default: on for "
        "CUDA workers, off on CPU"
    )
    seed: int = Field(
        0, ge=0, le=MAX_SEED,
        description="seed of every random choice (initialisation, data order, sampling)",
    )
    stages: list[Stage] = Field(
        min_length=1, max_length=16,
        description="training stages, run in order, each starting from the previous one's weights",
    )
    checkpoint_every_steps: int | None = Field(
        200, ge=1,
        le=MAX_STEPS, description="write a resumable checkpoint every N optimizer steps (and at stage ends)",
    )
    keep_checkpoints: int = Field(
        3, ge=1,
        le=1000, description="resumable checkpoints kept per stage (the best by eval_loss is kept too)",
    )
    export: list[Literal["adapter", "merged", "reward_model"]] = Field(
        ["adapter"],
        max_length=2, description="what the finished run exports: the adapter, a merged model, or both "
        "(a reward_model run: its reward_model checkpoint)",
    )
    integrations: Integrations = Field(Integrations(), description="experiment trackers to log metrics to")
    resources: Resources = Field(Resources(), description="devices the run needs from one worker")

    @model_validator(mode="after")
    def _stages_fit_devices(self) -> RunSpec:
        gpus = self.resources.gpus
        if gpus == 1:
            return self
        if isinstance(self.adapter, QLoraAdapter):
            raise ValueError("adapter.type 'qlora' trains on one device: FSDP2 over 4-bit bitsandbytes "
                             "weights is not verified with the installed peft and bitsandbytes; use "
                             "resources.gpus 1, or adapter.type 'lora' on several devices")
        for i, stage in enumerate(self.stages):
            if stage.method not in DISTRIBUTED_METHODS:
                raise ValueError(f"stages[{i}]: method {stage.method!r} trains on one device; "
                                 f"resources.gpus > 1 supports {' and '.join(DISTRIBUTED_METHODS)} stages")
            if stage.batch_size < gpus:
                raise ValueError(f"stages[{i}].batch_size ({stage.batch_size}) must be at least "
                                 f"resources.gpus ({gpus}): each device trains on a share of it")
        return self

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
    def _reward_model_alone(self) -> RunSpec:
        trains_reward_model = any(isinstance(stage, RewardModelStage) for stage in self.stages)
        if trains_reward_model and len(self.stages) > 1:
            raise ValueError(
                "a reward_model stage must be the only stage of its run: its model scores sequences and "
                "no later stage can continue it; train the policy in another run whose reward is "
                '{"type": "reward_model", "model": "<this run\'s checkpoint id>"}'
            )
        if trains_reward_model and "export" not in self.model_fields_set:
            object.__setattr__(self, "export", ["reward_model"])
        if trains_reward_model != (self.export == ["reward_model"]):
            raise ValueError("export ['reward_model'] goes with a reward_model stage, and only with one")
        return self

    @model_validator(mode="after")
    def _sglang_rollouts_need_an_adapter(self) -> RunSpec:
        for index, stage in enumerate(self.stages):
            rollout = getattr(stage, "rollout", None)
            if rollout is not None and rollout.engine == "sglang" and isinstance(self.adapter, FullAdapter):
                raise ValueError(
                    f"stages[{index}].rollout.engine 'sglang' reloads the policy's LoRA adapter after each "
                    "step; full fine-tuning has none: use engine 'local' or 'paged', or a LoRA adapter"
                )
        return self

    @model_validator(mode="after")
    def _export_matches_adapter(self) -> RunSpec:
        if isinstance(self.adapter, FullAdapter) and "adapter" in self.export:
            raise ValueError(
                "export 'adapter' needs adapter.type 'lora' or 'qlora'; full fine-tuning exports 'merged'"
            )
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
