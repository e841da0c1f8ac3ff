"""Grader specs: rewards in the JSON shapes of OpenAI's fine-tuning graders, plus Tuneyard's own.

Part of the run spec contract (``trainer_core.config``): imports without torch, and the API validates
graders with these same models (``POST /v1/graders/validate``). The graders themselves run in
``trainer_core.graders``.

- ``string_check``: ``input`` vs ``reference`` with ``operation`` eq | ne | like (contains) | ilike
  (contains, case-insensitive); 1.0 or 0.0.
- ``text_similarity``: ``evaluation_metric`` between ``input`` and ``reference``, in [0, 1].
- ``python``: ``source`` defining ``grade(sample, item) -> float``, run in the sandbox.
- ``score_model``: an LLM judge through an OpenAI-compatible ``/chat/completions`` endpoint.
- ``multi``: sub-graders by name and a ``calculate_output`` formula over their scores.
- ``code_output`` (Tuneyard): runs the record's program in the sandbox; 1.0 when its stdout equals
  the completion.
- ``reward_model`` (Tuneyard): a ``reward_model`` checkpoint scores prompt + completion.

Templates (``input``, ``reference``, message contents, ``program``): ``{{item.<field>}}`` reads the
prompt record's fields (dotted paths reach nested values), ``{{sample.output_text}}`` the
completion, ``{{sample.output_json}}`` (``.<field>``) the completion parsed as JSON.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from typing import Annotated, Literal, Union

import httpx
from pydantic import AfterValidator, BaseModel, Field, field_validator, model_validator

from trainer_core.reward_config import REWARD_SPEC_CLASSES
from trainer_core.spec_base import MAX_LIST, MAX_SEED, SpecModel

TEMPLATE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_TEMPLATE_PATH = re.compile(r"(item|sample)(\.[A-Za-z_][A-Za-z0-9_]*)*")
_SAMPLE_FIELDS = ("output_text", "output_json")
_GRADER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_template(text: str) -> str:
    """Returns ``text`` or raises ValueError naming the first placeholder no sample/record can fill."""
    for match in TEMPLATE.finditer(text):
        path = match.group(1)
        if not _TEMPLATE_PATH.fullmatch(path):
            raise ValueError(
                f"template placeholder {match.group(0)!r}: use {{{{item.<field>}}}}, "
                "{{sample.output_text}} or {{sample.output_json}}"
            )
        parts = path.split(".")
        if parts[0] == "item" and len(parts) == 1:
            raise ValueError(f"template placeholder {match.group(0)!r} names no record field")
        if parts[0] == "sample" and (len(parts) == 1 or parts[1] not in _SAMPLE_FIELDS):
            raise ValueError(
                f"template placeholder {match.group(0)!r}: a sample has {', '.join(_SAMPLE_FIELDS)}"
            )
        if parts[0] == "sample" and parts[1] == "output_text" and len(parts) > 2:
            raise ValueError(f"template placeholder {match.group(0)!r}: output_text has no fields")
    return text


Template = Annotated[str, Field(min_length=1, max_length=64_000), AfterValidator(check_template)]


class _GraderBase(SpecModel):
    # OpenAI requires a name; here it defaults to the type so a one-grader spec stays short.
    name: str | None = Field(
        None, min_length=1, max_length=64,
        description="the grader's name (metrics: rewards/<name>); default: its type",
    )

    @model_validator(mode="after")
    def _default_name(self) -> _GraderBase:
        if self.name is None:
            object.__setattr__(self, "name", self.type)  # type: ignore[attr-defined]
        return self

    @property
    def label(self) -> str:
        """Returns the name metrics use: ``rewards/<label>``."""
        return self.name or self.type  # type: ignore[attr-defined]


class StringCheckGrader(_GraderBase):
    type: Literal["string_check"] = Field(description="compares input with reference: 1.0 or 0.0")
    input: Template = Field("{{sample.output_text}}", description="template of the graded text")
    reference: Template = Field(description="template of the reference text")
    operation: Literal["eq", "ne", "like", "ilike"] = Field(
        "eq",
        description="eq, ne, like (contains) or ilike (contains, case-insensitive)",
    )


SimilarityMetric = Literal[
    "fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l",
]

# The library each metric comes from (module to import, pip package).
_METRIC_LIBRARY: dict[str, tuple[str, str]] = {
    "fuzzy_match": ("rapidfuzz", "rapidfuzz"),
    "bleu": ("sacrebleu", "sacrebleu"),
    "gleu": ("nltk", "nltk"),
    "meteor": ("nltk", "nltk"),
    **{f"rouge_{n}": ("rouge_score", "rouge-score") for n in ("1", "2", "3", "4", "5", "l")},
}


def unavailable_metric_reason(metric: str) -> str | None:
    """Returns why this installation cannot compute ``metric``, or None when it can."""
    module, package = _METRIC_LIBRARY[metric]
    if importlib.util.find_spec(module) is None:
        return f"evaluation_metric {metric!r} needs the {package!r} package, which is not installed"
    if metric == "meteor":
        import nltk  # only for meteor: its synonym matching needs NLTK's WordNet data

        try:
            nltk.data.find("corpora/wordnet")
        except LookupError:
            try:
                nltk.data.find("corpora/wordnet.zip")
            except LookupError:
                return ("evaluation_metric 'meteor' needs NLTK's WordNet corpus, which this server does "
                        "not have; use bleu, gleu, rouge_* or fuzzy_match")
    return None


class TextSimilarityGrader(_GraderBase):
    type: Literal["text_similarity"] = Field(
        description="a similarity between input and reference, in [0, 1]",
    )
    input: Template = Field("{{sample.output_text}}", description="template of the graded text")
    reference: Template = Field(description="template of the reference text")
    evaluation_metric: SimilarityMetric = Field("fuzzy_match", description="the similarity measure")
    pass_threshold: float | None = Field(
        None, ge=0, le=1,
        description="OpenAI's pass mark, accepted for compatibility; the reward is the similarity itself",
    )

    @field_validator("evaluation_metric")
    @classmethod
    def _available(cls, v: str) -> str:
        reason = unavailable_metric_reason(v)
        if reason:
            raise ValueError(reason)
        return v


def check_python_source(source: str, function: str = "grade", arity: int = 2) -> str:
    """Returns ``source`` or raises ValueError when it does not parse or define ``function``."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise ValueError(f"source does not parse: line {exc.lineno}: {exc.msg}") from None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == function:
            if len(node.args.args) + len(node.args.posonlyargs) < arity and node.args.vararg is None:
                raise ValueError(f"source: {function}() must take (sample, item)")
            return source
    raise ValueError(f"source must define a top-level function {function}(sample, item) -> float")


class PythonGrader(_GraderBase):
    type: Literal["python"] = Field(
        description="source defining grade(sample, item) -> float, run in the sandbox",
    )
    source: str = Field(
        min_length=1, max_length=256_000,
        description="Python source defining grade(sample, item)",
    )
    # OpenAI's field; the sandbox here is the worker's own Python, so any value means "default".
    image_tag: str | None = Field(
        None,
        max_length=200,
        description="accepted for OpenAI compatibility; the worker's sandbox runs every grader",
    )
    timeout_seconds: float = Field(5.0, gt=0, le=60, description="wall-clock limit per sample")

    @field_validator("source")
    @classmethod
    def _defines_grade(cls, v: str) -> str:
        return check_python_source(v)


class JudgeMessage(SpecModel):
    type: Literal["message"] = Field("message", description="a chat message")
    role: Literal["system", "developer", "user", "assistant"] = Field(description="the message's role")
    content: Template = Field(description="template of the message text")


class JudgeSamplingParams(SpecModel):
    temperature: float | None = Field(
        None, ge=0, le=2,
        description="the judge's sampling temperature; default: the endpoint's",
    )
    top_p: float | None = Field(
        None, gt=0, le=1,
        description="the judge's nucleus mass; default: the endpoint's",
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="the judge's sampling seed")
    max_completions_tokens: int | None = Field(
        None, ge=1, le=32_768,
        description="most tokens of the judge's reply",
    )
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = Field(
        None,
        description="passed to reasoning models",
    )


class ScoreModelGrader(_GraderBase):
    """An LLM judge; its reply's last number, clamped to ``range``, is the score.

    ``base_url``: an OpenAI-compatible API root (``.../v1``); default: the worker's configured judge
    endpoint (Tuneyard's own inference API). ``api_key_env``: the worker environment variable that
    holds the key (never the key itself: specs are stored and shown).
    """

    type: Literal["score_model"] = Field(
        description="an LLM judge; its reply's last number, clamped to range, is the score",
    )
    model: str = Field(min_length=1, max_length=400, description="the judge model's name at the endpoint")
    input: list[JudgeMessage] = Field(
        min_length=1, max_length=MAX_LIST,
        description="the messages sent to the judge",
    )
    range: tuple[float, float] = Field((0.0, 1.0), description="the lowest and highest score")
    sampling_params: JudgeSamplingParams = Field(
        JudgeSamplingParams(),
        description="how the judge samples its reply",
    )
    base_url: str | None = Field(
        None, pattern=r"^https?://[^/\s?#]+(/\S*)?$",
        max_length=2000, description="an OpenAI-compatible API root; default: the worker's judge endpoint",
    )
    api_key_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="the worker environment variable holding the endpoint's key",
    )
    max_concurrency: int = Field(8, ge=1, le=128, description="judge requests in flight at once")
    max_retries: int = Field(4, ge=0, le=10, description="retries of a failed judge request")
    timeout_seconds: float = Field(60.0, gt=0, le=600, description="time limit per judge request")

    @field_validator("base_url")
    @classmethod
    def _reachable_form(cls, v: str | None) -> str | None:
        # The pattern admits any host characters; the client that calls the judge (httpx) refuses a
        # host that is not a valid (IDNA) name, which must be a 422 here, not an error at scoring.
        if v is not None:
            try:
                httpx.URL(v)
            except httpx.InvalidURL as exc:
                raise ValueError(f"not a usable URL: {exc}") from None
        return v

    @field_validator("range")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not v[0] < v[1]:
            raise ValueError(f"range must be [low, high] with low < high, got {list(v)}")
        return v


class CodeOutputGrader(_GraderBase):
    """Runs the record's program in the sandbox; 1.0 when its stdout matches the completion."""

    type: Literal["code_output"] = Field(
        description="runs the record's program in the sandbox: 1.0 when its stdout equals input",
    )
    program: Template = Field("{{item.program}}", description="template of the program to run")
    input: Template = Field(
        "{{sample.output_text}}",
        description="template of the text the program's output must equal",
    )
    comparison: Literal["exact", "normalized"] = Field(
        "normalized",
        description="exact (up to trailing whitespace) or normalized (whitespace runs collapsed)",
    )
    timeout_seconds: float = Field(5.0, gt=0, le=60, description="wall-clock limit per program")


class RewardModelGrader(_GraderBase):
    """Scores prompt + completion with a ``reward_model`` checkpoint (the raw scalar head output)."""

    type: Literal["reward_model"] = Field(description="a reward_model checkpoint scores prompt + completion")
    model: str = Field(min_length=1, max_length=400, description="a checkpoint id of kind reward_model")
    batch_size: int = Field(16, ge=1, le=1024, description="completions scored per forward pass")


# Graders that score samples themselves (a multi combines these; it does not nest).
SUB_GRADER_CLASSES = (
    StringCheckGrader, TextSimilarityGrader, PythonGrader, ScoreModelGrader, CodeOutputGrader,
    RewardModelGrader,
)
SubGrader = Annotated[Union[SUB_GRADER_CLASSES], Field(discriminator="type")]  # noqa: UP007 - from a tuple

# What a multi formula may call (besides + - * / ** and comparisons); the names the evaluator gets.
FORMULA_FUNCTIONS: tuple[str, ...] = ("min", "max", "abs", "floor", "ceil", "exp", "sqrt", "log", "round")


class MultiGrader(_GraderBase):
    """Sub-graders by name and a formula over their scores (``0.7 * answer + 0.3 * style``)."""

    type: Literal["multi"] = Field(description="sub-graders by name and a formula over their scores")
    graders: dict[str, SubGrader] = Field(
        min_length=1, max_length=16,
        description="sub-graders by name (the names the formula uses)",
    )
    calculate_output: str = Field(
        min_length=1, max_length=2000,
        description="the formula, e.g. 0.7 * answer + 0.3 * style",
    )

    @field_validator("graders")
    @classmethod
    def _names(cls, v: dict[str, SubGrader]) -> dict[str, SubGrader]:
        for key in v:
            if not _GRADER_NAME.fullmatch(key) or key in FORMULA_FUNCTIONS:
                raise ValueError(f"grader key {key!r} must be an identifier and not a formula function")
        return v

    @model_validator(mode="after")
    def _formula(self) -> MultiGrader:
        from trainer_core.graders.formula import check_formula

        check_formula(self.calculate_output, set(self.graders))
        return self


Grader = Annotated[Union[(*SUB_GRADER_CLASSES, MultiGrader)], Field(discriminator="type")]  # noqa: UP007
# A stage's `reward`: a Tuneyard reward spec (exact_match ... combined) or a grader.
StageReward = Annotated[
    Union[(*REWARD_SPEC_CLASSES, *SUB_GRADER_CLASSES, MultiGrader)], Field(discriminator="type")  # noqa: UP007
]

GRADER_TYPES: tuple[str, ...] = (
    "string_check", "text_similarity", "python", "score_model", "multi", "code_output", "reward_model",
)


def leaf_graders(grader: BaseModel) -> list[BaseModel]:
    """Returns the graders that score samples themselves: a multi's sub-graders, else the grader."""
    return list(grader.graders.values()) if isinstance(grader, MultiGrader) else [grader]


def reward_model_ids(reward: BaseModel) -> list[str]:
    """Returns the checkpoint ids of the reward models a stage reward uses."""
    return [g.model for g in leaf_graders(reward) if isinstance(g, RewardModelGrader)]
