"""Batch scoring of completions with a stage's reward: a grader or a Tuneyard reward spec.

``build_grader(reward, runtime)`` returns a ``BatchGrader``: ``grader(texts, items)`` scores every
completion of a batch against its prompt record (``item``) at once — one sandbox process for all
the batch's ``python`` samples, one concurrent wave of judge requests — and returns the totals with
per-grader means and error counts (``rewards/<name>``, ``rewards/<name>/errors``).

A sample whose grader fails (exception, timeout, non-number, NaN, missing template field, judge
reply without a score) scores 0 and is counted as an error; it never ends the run. What does end
it: a judge that stays unreachable (``JudgeUnavailable``) and a sandbox that cannot start.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel

from trainer_core.errors import GraderFailure
from trainer_core.grader_config import (
    CodeOutputGrader,
    MultiGrader,
    PythonGrader,
    RewardModelGrader,
    ScoreModelGrader,
    StringCheckGrader,
    TextSimilarityGrader,
    leaf_graders,
)
from trainer_core.graders.formula import evaluate_formula
from trainer_core.graders.judge import Judge
from trainer_core.graders.sandbox import Sandbox, default_sandbox
from trainer_core.graders.similarity import similarity
from trainer_core.graders.templates import GradingError, make_sample, render
from trainer_core.reward_config import REWARD_SPEC_CLASSES, reward_functions
from trainer_core.rewards import combined_reward

Outcome = float | GradingError
# (texts, items) -> per-sample score of a reward model (``trainer_core.reward_models``).
RewardModelScorer = Callable[[Sequence[str], Sequence[Mapping[str, Any]]], list[float]]


class GraderSetupError(GraderFailure):
    """A grader cannot be built here (missing judge URL or key, unknown reward model)."""


@dataclass
class GraderRuntime:
    """What graders need from where they run; the worker fills it, tests hand their own.

    ``secrets``: the environment ``api_key_env`` names are read from (the library never reads
    ``os.environ`` itself). ``judge_base_url`` / ``judge_api_key``: the default ``score_model``
    endpoint (Tuneyard's own API). ``reward_model``: loads a ``reward_model`` checkpoint's scorer.
    """

    sandbox: Callable[[], Sandbox] = default_sandbox
    secrets: Mapping[str, str] = field(default_factory=dict)
    judge_base_url: str | None = None
    judge_api_key: str | None = None
    reward_model: Callable[[RewardModelGrader], RewardModelScorer] | None = None


@dataclass
class BatchScores:
    """Scores of one batch: totals, each leaf grader's per-sample scores, errors, first messages."""

    totals: list[float]
    components: dict[str, list[float]]
    errors: dict[str, int]
    messages: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """Returns ``rewards/<name>`` means and, for graders, ``rewards/<name>/errors`` counts."""
        count = max(len(self.totals), 1)
        out = {f"rewards/{name}": sum(values) / count for name, values in self.components.items()}
        out |= {f"rewards/{name}/errors": float(n) for name, n in self.errors.items()}
        return out


class BatchGrader(Protocol):
    def __call__(self, texts: Sequence[str], items: Sequence[Mapping[str, Any]]) -> BatchScores: ...


class _Leaf(Protocol):
    def __call__(
        self, samples: list[dict[str, Any]], items: Sequence[Mapping[str, Any]]
    ) -> list[Outcome]: ...


def _per_sample(fn: Callable[[dict[str, Any], Mapping[str, Any]], float]) -> _Leaf:
    def score(samples: list[dict[str, Any]], items: Sequence[Mapping[str, Any]]) -> list[Outcome]:
        out: list[Outcome] = []
        for sample, item in zip(samples, items, strict=True):
            try:
                out.append(float(fn(sample, item)))
            except GradingError as exc:
                out.append(exc)
        return out

    return score


def string_check(spec: StringCheckGrader, sample: dict[str, Any], item: Mapping[str, Any]) -> float:
    """Returns 1.0 when ``input`` passes ``operation`` against ``reference``, else 0.0."""
    text, reference = render(spec.input, sample, item), render(spec.reference, sample, item)
    if spec.operation == "eq":
        return float(text == reference)
    if spec.operation == "ne":
        return float(text != reference)
    if spec.operation == "like":
        return float(reference in text)
    return float(reference.lower() in text.lower())


def outputs_match(stdout: str, predicted: str, comparison: str) -> bool:
    """Returns whether a program's stdout equals the prediction: ``exact`` up to trailing whitespace,
    ``normalized`` with every run of whitespace collapsed (and none at the ends)."""
    if comparison == "exact":
        return stdout.rstrip() == predicted.rstrip()
    return stdout.split() == predicted.split()


def _code_output(spec: CodeOutputGrader, runtime: GraderRuntime) -> _Leaf:
    def score(samples: list[dict[str, Any]], items: Sequence[Mapping[str, Any]]) -> list[Outcome]:
        programs: list[str | GradingError] = []
        for sample, item in zip(samples, items, strict=True):
            try:
                programs.append(render(spec.program, sample, item))
            except GradingError as exc:
                programs.append(exc)
        # GRPO scores G completions of one prompt: each distinct program runs once.
        unique = sorted({p for p in programs if isinstance(p, str)})
        stdout = dict(zip(unique, runtime.sandbox().run_programs(unique, spec.timeout_seconds), strict=True))
        out: list[Outcome] = []
        for sample, item, program in zip(samples, items, programs, strict=True):
            result = program if isinstance(program, GradingError) else stdout[program]
            if isinstance(result, GradingError):
                out.append(GradingError(f"the program failed: {result}"))
                continue
            try:
                out.append(float(outputs_match(result, render(spec.input, sample, item), spec.comparison)))
            except GradingError as exc:
                out.append(exc)
        return out

    return score


def _python(spec: PythonGrader, runtime: GraderRuntime) -> _Leaf:
    def score(samples: list[dict[str, Any]], items: Sequence[Mapping[str, Any]]) -> list[Outcome]:
        return runtime.sandbox().grade(spec.source, samples, [dict(i) for i in items], spec.timeout_seconds)

    return score


def _judge(spec: ScoreModelGrader, runtime: GraderRuntime) -> _Leaf:
    base_url = spec.base_url or runtime.judge_base_url
    if base_url is None:
        raise GraderSetupError(
            f"score_model grader {spec.label!r}: no base_url, and this worker has no default judge endpoint"
        )
    if spec.api_key_env is not None:
        if spec.api_key_env not in runtime.secrets:
            raise GraderSetupError(
                f"score_model grader {spec.label!r}: api_key_env {spec.api_key_env!r} is not set in the "
                "worker's environment"
            )
        api_key: str | None = runtime.secrets[spec.api_key_env]
    else:
        api_key = runtime.judge_api_key if spec.base_url is None else None
    judge = Judge(spec, base_url, api_key)
    return lambda samples, items: judge.score(samples, list(items))


def _reward_model(spec: RewardModelGrader, runtime: GraderRuntime) -> _Leaf:
    if runtime.reward_model is None:
        raise GraderSetupError(f"reward_model grader {spec.label!r}: reward models cannot be loaded here")
    scorer = runtime.reward_model(spec)

    def score(samples: list[dict[str, Any]], items: Sequence[Mapping[str, Any]]) -> list[Outcome]:
        return list(scorer([s["output_text"] for s in samples], items))

    return score


def leaf_scorer(spec: BaseModel, runtime: GraderRuntime) -> _Leaf:
    """Returns the batch scoring function of a grader that is not a ``multi``."""
    if isinstance(spec, StringCheckGrader):
        return _per_sample(lambda sample, item: string_check(spec, sample, item))
    if isinstance(spec, TextSimilarityGrader):
        return _per_sample(lambda sample, item: similarity(
            spec.evaluation_metric, render(spec.input, sample, item), render(spec.reference, sample, item)))
    if isinstance(spec, PythonGrader):
        return _python(spec, runtime)
    if isinstance(spec, CodeOutputGrader):
        return _code_output(spec, runtime)
    if isinstance(spec, ScoreModelGrader):
        return _judge(spec, runtime)
    if isinstance(spec, RewardModelGrader):
        return _reward_model(spec, runtime)
    raise TypeError(f"not a grader: {type(spec).__name__}")


class GraderScorer:
    """A grader (or a multi of graders) as a ``BatchGrader``."""

    def __init__(self, spec: BaseModel, runtime: GraderRuntime) -> None:
        if isinstance(spec, MultiGrader):
            self._formula: str | None = spec.calculate_output
            self._label = spec.label
            self._leaves = {name: leaf_scorer(sub, runtime) for name, sub in spec.graders.items()}
        else:
            self._formula = None
            self._label = spec.label  # type: ignore[attr-defined]
            self._leaves = {self._label: leaf_scorer(spec, runtime)}

    def __call__(self, texts: Sequence[str], items: Sequence[Mapping[str, Any]]) -> BatchScores:
        samples = [make_sample(text) for text in texts]
        components: dict[str, list[float]] = {}
        errors: dict[str, int] = {}
        messages: list[str] = []
        for name, leaf in self._leaves.items():
            outcomes = leaf(samples, items)
            components[name] = [0.0 if isinstance(o, GradingError) else o for o in outcomes]
            failed = [str(o) for o in outcomes if isinstance(o, GradingError)]
            errors[name] = len(failed)
            messages += [f"{name}: {m}" for m in failed[:3]]
        if self._formula is None:
            return BatchScores(components[self._label], components, errors, messages)
        totals: list[float] = []
        errors[self._label] = 0
        for index in range(len(texts)):
            try:
                value = evaluate_formula(self._formula, {n: v[index] for n, v in components.items()})
                if not math.isfinite(value):
                    raise ValueError(f"calculate_output gave {value}")
                totals.append(value)
            except ValueError as exc:
                totals.append(0.0)
                errors[self._label] += 1
                messages.append(f"{self._label}: {exc}")
        components[self._label] = totals
        return BatchScores(totals, components, errors, messages)


class LegacyRewardScorer:
    """A Tuneyard reward spec (exact_match ... combined) as a ``BatchGrader``: reads ``item["answer"]``."""

    def __init__(self, spec: BaseModel) -> None:
        functions = [
            (fn.type, fn.weight, fn.model_dump(exclude={"type", "weight"}))
            for fn in reward_functions(spec)  # type: ignore[arg-type]
        ]
        self._score = combined_reward(functions)

    def __call__(self, texts: Sequence[str], items: Sequence[Mapping[str, Any]]) -> BatchScores:
        totals: list[float] = []
        components: dict[str, list[float]] = {}
        for text, item in zip(texts, items, strict=True):
            total, per_function = self._score(text, item.get("answer"))
            totals.append(total)
            for name, value in per_function.items():
                components.setdefault(name, []).append(value)
        return BatchScores(totals, components, {})


def needs_sandbox(reward: BaseModel) -> bool:
    """Returns whether a stage reward runs code in the grader sandbox (python, code_output)."""
    return any(isinstance(g, PythonGrader | CodeOutputGrader) for g in leaf_graders(reward))


def build_grader(reward: BaseModel, runtime: GraderRuntime | None = None) -> BatchGrader:
    """Returns the batch scorer of a stage's ``reward`` (a grader or a Tuneyard reward spec)."""
    if isinstance(reward, REWARD_SPEC_CLASSES):
        return LegacyRewardScorer(reward)
    return GraderScorer(reward, runtime or GraderRuntime())
