"""Reward functions for PPO and GRPO, by name, combinable with weights. Pure python (no torch).

Every reward function is ``fn(completion: str, answer: str | None, **params) -> float``. Names and
parameter names match the reward specs in ``trainer_core.reward_config``:

- ``exact_match``: 1.0 when the extracted final answer equals the reference after normalisation.
- ``numeric_match(tolerance=1e-6)``: 1.0 when the last number of the extracted answer is within
  ``tolerance`` (absolute, or relative for large numbers) of the reference number.
- ``regex(pattern)``: 1.0 when ``pattern`` is found anywhere in the completion (``re.search``).
- ``contains(text=None)``: 1.0 when ``text`` (default: the reference answer) occurs in the completion,
  compared case-insensitively with whitespace collapsed.
- ``format(pattern=None)``: 1.0 when the whole completion matches ``pattern`` (``re.fullmatch``,
  ``.`` matches newlines); default: a ``<think>...</think>`` block followed by a non-empty answer.
- ``length_penalty(max_length=512, penalty_per_char=0.001)``: ``-penalty_per_char`` per character
  beyond ``max_length``; 0.0 within it.

Final-answer extraction (exact_match, numeric_match; applied to the completion and to the reference,
so a GSM8K-style reference "...#### 72" works): a ``<think>...</think>`` block is dropped first,
then the first of these that is present wins: the last ``\\boxed{...}``, the text after the last
``####``, the text after the last ``Answer:`` (case-insensitive, up to the end of that line);
otherwise the whole text. Normalisation: strip, lowercase, collapse whitespace, strip trailing
punctuation (``.,;:!?``).

User patterns (``regex``, ``format``) run on the ``regex`` engine with a time bound and without
holding the GIL: a catastrophically backtracking pattern such as ``(.+)+\u2603`` ends the run with a
TrainingDataError naming it, instead of spinning forever and starving the worker's heartbeat.
Errors caused by the data or the spec (a record without the answer a reward needs) are
TrainingDataErrors too: retrying cannot fix them.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import regex as user_regex

from trainer_core.errors import TrainingDataError

RewardFn = Callable[..., float]
CombinedRewardFn = Callable[[str, "str | None"], tuple[float, dict[str, float]]]

DEFAULT_FORMAT_PATTERN = r"\s*<think>.*?</think>\s*\S.*"

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_ANSWER_LINE = re.compile(r"answer\s*:(.*)", re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_TRAILING_PUNCTUATION = ".,;:!?"
PATTERN_TIMEOUT_SECONDS = 1.0  # per completion: linear patterns take microseconds


def _last_boxed(text: str) -> str | None:
    """Return the contents of the last ``\\boxed{...}`` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    begin = start + len("\\boxed{")
    for index in range(begin, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            if depth == 0:
                return text[begin:index]
            depth -= 1
    return None


def extract_final_answer(text: str) -> str:
    """Return the final-answer part of ``text`` (see the module docstring for the rules)."""
    text = _THINK_BLOCK.sub("", text)
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        return text.rsplit("####", 1)[1]
    answer_lines = _ANSWER_LINE.findall(text)
    if answer_lines:
        return answer_lines[-1]
    return text


def normalize_answer(text: str) -> str:
    """Return ``text`` stripped, lowercased, whitespace-collapsed, without trailing punctuation."""
    collapsed = " ".join(text.lower().split())
    return collapsed.rstrip(_TRAILING_PUNCTUATION).rstrip()


def _need_answer(name: str, answer: str | None) -> str:
    """Return ``answer``, or raise: these rewards compare against a reference answer."""
    if answer is None:
        raise TrainingDataError(f"reward {name!r} needs a reference answer; a prompt record has no 'answer'")
    return answer


def exact_match(completion: str, answer: str | None) -> float:
    """Return 1.0 when the normalised final answers of completion and reference are equal, else 0.0."""
    reference = normalize_answer(extract_final_answer(_need_answer("exact_match", answer)))
    return float(normalize_answer(extract_final_answer(completion)) == reference)


def _last_number(text: str) -> float | None:
    """Return the last number in ``text`` (thousands separators ignored), or None."""
    for match in reversed(_NUMBER.findall(text)):
        try:
            return float(match.replace(",", ""))
        except ValueError:
            continue
    return None


def numeric_match(completion: str, answer: str | None, *, tolerance: float = 1e-6) -> float:
    """Return 1.0 when the completion's last number is within ``tolerance`` of the reference number.

    The tolerance is both absolute and relative (``math.isclose``), so it suits 0.5 and 1e9 alike.
    A reference without a number raises; a completion without one scores 0.0.
    """
    reference = _last_number(extract_final_answer(_need_answer("numeric_match", answer)))
    if reference is None:
        raise TrainingDataError(f"reward 'numeric_match' found no number in the reference answer {answer!r}")
    predicted = _last_number(extract_final_answer(completion))
    if predicted is None:
        return 0.0
    return float(math.isclose(predicted, reference, rel_tol=tolerance, abs_tol=tolerance))


def _match_user_pattern(name: str, pattern: str, completion: str, whole: bool) -> bool:
    """Returns whether a user pattern matches; raises TrainingDataError if it runs past its time bound."""
    match = user_regex.fullmatch if whole else user_regex.search
    flags = user_regex.DOTALL if whole else 0
    try:
        return match(pattern, completion, flags, timeout=PATTERN_TIMEOUT_SECONDS, concurrent=True) is not None
    except TimeoutError:
        raise TrainingDataError(
            f"reward {name!r}: pattern {pattern!r} took over {PATTERN_TIMEOUT_SECONDS:g} s on one "
            f"{len(completion)}-character completion (catastrophic backtracking, e.g. a nested quantifier "
            "like (.+)+); rewrite it without nested or overlapping repetition") from None


def regex(completion: str, answer: str | None, *, pattern: str) -> float:
    """Return 1.0 when ``pattern`` is found in the completion (``re.search``), else 0.0."""
    return float(_match_user_pattern("regex", pattern, completion, whole=False))


def contains(completion: str, answer: str | None, *, text: str | None = None) -> float:
    """Return 1.0 when ``text`` (default: the answer) occurs in the completion, case/space-insensitively."""
    needle = text if text is not None else _need_answer("contains", answer)
    normalized_needle = " ".join(needle.lower().split())
    if not normalized_needle:
        raise TrainingDataError("reward 'contains' needs a non-empty text to look for")
    return float(normalized_needle in " ".join(completion.lower().split()))


def format_reward(completion: str, answer: str | None, *, pattern: str | None = None) -> float:
    """Return 1.0 when the whole completion matches ``pattern`` (default: think block then answer)."""
    layout = DEFAULT_FORMAT_PATTERN if pattern is None else pattern
    return float(_match_user_pattern("format", layout, completion, whole=True))


def length_penalty(
    completion: str, answer: str | None, *, max_length: int = 512, penalty_per_char: float = 0.001
) -> float:
    """Return -penalty_per_char * (characters beyond max_length), 0.0 for completions within it."""
    return -penalty_per_char * max(0, len(completion) - max_length)


REWARD_FUNCTIONS: Mapping[str, RewardFn] = {
    "exact_match": exact_match,
    "numeric_match": numeric_match,
    "regex": regex,
    "contains": contains,
    "format": format_reward,
    "length_penalty": length_penalty,
}
REWARD_TYPES: tuple[str, ...] = tuple(REWARD_FUNCTIONS)


def get_reward(name: str) -> RewardFn:
    """Return the reward function registered under ``name``; raise ValueError naming it if unknown."""
    try:
        return REWARD_FUNCTIONS[name]
    except KeyError:
        raise ValueError(f"unknown reward type {name!r}; known types: {', '.join(REWARD_TYPES)}") from None


def _check_params(name: str, fn: RewardFn, params: Mapping[str, Any]) -> None:
    """Raise ValueError when ``params`` do not fit ``fn``'s keyword parameters or a pattern is invalid."""
    try:
        inspect.signature(fn).bind("", None, **params)
    except TypeError as exc:
        raise ValueError(f"reward {name!r}: bad parameters {dict(params)}: {exc}") from None
    pattern = params.get("pattern")
    if pattern is not None:
        try:
            user_regex.compile(pattern)
        except user_regex.error as exc:
            raise ValueError(f"reward {name!r}: pattern {pattern!r} is not a valid regex: {exc}") from None


def combined_reward(functions: Sequence[tuple[str, float, Mapping[str, Any]]]) -> CombinedRewardFn:
    """Return ``score(completion, answer) -> (total, per_function)`` for weighted reward functions.

    ``functions``: ``(name, weight, params)`` triples; names and params are checked here, once, so
    a bad spec fails before any generation. ``total`` = sum of weight * reward; ``per_function``
    maps each name to its unweighted reward (a repeated name gets ``_2``, ``_3``... suffixes).
    """
    if not functions:
        raise ValueError("combined_reward needs at least one reward function")
    resolved: list[tuple[str, float, RewardFn, dict[str, Any]]] = []
    seen: dict[str, int] = {}
    for name, weight, params in functions:
        fn = get_reward(name)
        _check_params(name, fn, params)
        seen[name] = seen.get(name, 0) + 1
        key = name if seen[name] == 1 else f"{name}_{seen[name]}"
        resolved.append((key, float(weight), fn, dict(params)))

    def score(completion: str, answer: str | None) -> tuple[float, dict[str, float]]:
        per_function = {key: float(fn(completion, answer, **params)) for key, _, fn, params in resolved}
        total = sum(weight * per_function[key] for key, weight, _, _ in resolved)
        return total, per_function

    return score
