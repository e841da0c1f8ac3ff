"""The ``score_model`` grader's client: an LLM judge behind any OpenAI-compatible ``/chat/completions``.

A batch's requests go out concurrently (at most ``max_concurrency`` at once); 429, 5xx and transport
errors are retried with exponential backoff (``Retry-After`` honoured). A judge still failing after
``max_retries`` raises ``JudgeUnavailable``, which fails the training step: an unreachable judge
must never quietly score every sample 0. A reply without a number is that sample's GradingError.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from trainer_core.errors import GraderFailure
from trainer_core.grader_config import ScoreModelGrader
from trainer_core.graders.templates import GradingError, render

_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_RETRY_STATUS = {408, 409, 425, 429}
_MAX_BACKOFF_SECONDS = 8.0


class JudgeUnavailable(GraderFailure):
    """The judge endpoint kept failing after every retry: the step cannot be scored."""


def parse_score(reply: str, low: float, high: float) -> float:
    """Returns the last number of a judge's reply clamped to [low, high]; GradingError if there is none."""
    numbers = _NUMBER.findall(reply)
    if not numbers:
        raise GradingError(f"the judge's reply has no score: {reply[:200]!r}")
    return min(high, max(low, float(numbers[-1])))


class Judge:
    """Scores samples with one ``score_model`` grader spec against one endpoint."""

    def __init__(self, spec: ScoreModelGrader, base_url: str, api_key: str | None,
                 backoff_seconds: float = 0.5) -> None:
        self._spec = spec
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._backoff = backoff_seconds

    def _body(self, sample: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
        spec = self._spec
        body: dict[str, Any] = {
            "model": spec.model,
            "messages": [{"role": m.role, "content": render(m.content, sample, item)} for m in spec.input],
        }
        params = spec.sampling_params
        for name in ("temperature", "top_p", "seed", "reasoning_effort"):
            if getattr(params, name) is not None:
                body[name] = getattr(params, name)
        if params.max_completions_tokens is not None:
            body["max_tokens"] = params.max_completions_tokens
        return body

    def _ask(self, client: httpx.Client, body: dict[str, Any]) -> str:
        last = ""
        for attempt in range(self._spec.max_retries + 1):
            if attempt:
                time.sleep(min(_MAX_BACKOFF_SECONDS, self._backoff * 2 ** (attempt - 1)))
            try:
                response = client.post(self._url, json=body, headers=self._headers)
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code in _RETRY_STATUS or response.status_code >= 500:
                last = f"HTTP {response.status_code}: {response.text[:200]}"
                retry_after = response.headers.get("retry-after", "")
                if retry_after.replace(".", "", 1).isdigit():
                    time.sleep(min(_MAX_BACKOFF_SECONDS, float(retry_after)))
                continue
            if response.status_code >= 400:
                # A request the judge refuses (bad model name, bad key) will not improve with retries.
                raise JudgeUnavailable(
                    f"score_model judge {self._url} refused the request: HTTP {response.status_code}: "
                    f"{response.text[:300]}"
                )
            try:
                return str(response.json()["choices"][0]["message"]["content"] or "")
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise GradingError(f"the judge's answer is not a chat completion: {exc}") from None
        raise JudgeUnavailable(
            f"score_model judge {self._url} failed after {self._spec.max_retries + 1} attempts: {last}"
        )

    def score(
        self, samples: Sequence[dict[str, Any]], items: Sequence[dict[str, Any]]
    ) -> list[float | GradingError]:
        """Returns each sample's judged score (or its GradingError); raises JudgeUnavailable."""
        low, high = self._spec.range

        def one(client: httpx.Client, sample: dict[str, Any], item: dict[str, Any]) -> float | GradingError:
            try:
                return parse_score(self._ask(client, self._body(sample, item)), low, high)
            except GradingError as exc:
                return exc

        workers = min(self._spec.max_concurrency, max(1, len(samples)))
        limits = httpx.Limits(max_connections=workers)
        with httpx.Client(timeout=self._spec.timeout_seconds, limits=limits) as client, \
                ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(one, client, s, i) for s, i in zip(samples, items, strict=True)]
            return [future.result() for future in futures]
