"""What every inference backend takes and gives back, free of torch so the API imports it cheaply.

Sampling parameters and token log-probs are trainer_core's (``trainer_core.config``), shared with
evals and the decoder.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from trainer_core.config import SamplingParams, TokenLogprob

ModelKind = Literal["base", "adapter", "merged"]
FinishReason = Literal["stop", "length"]
# A chat is a list of {"role", "content"} messages; a plain completion prompt is a string.
Prompt = list[dict[str, Any]] | str


@dataclass(frozen=True)
class ResolvedModel:
    """A model a request named, resolved to folders on disk.

    ``id`` is what responses echo (a base model name or a checkpoint id); ``base_path`` is the base
    model folder, ``checkpoint_path`` the adapter or merged folder of a checkpoint.
    """

    id: str
    kind: ModelKind
    base_model: str
    base_path: Path
    checkpoint_path: Path | None = None

    @property
    def weights_path(self) -> Path:
        """Returns the folder whose weights are served directly (merged checkpoint or base)."""
        return self.checkpoint_path if self.kind == "merged" and self.checkpoint_path else self.base_path

    @property
    def start_adapter(self) -> Path | None:
        """Returns the adapter folder training continues from (adapter checkpoints), else None."""
        return self.checkpoint_path if self.kind == "adapter" else None


@dataclass(frozen=True)
class Choice:
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class Generation:
    """A finished request: one choice per sample, with token counts for ``usage``."""

    model: str
    choices: list[Choice]
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Delta:
    """A piece of a streamed choice; ``finish_reason`` is set on the last piece of that choice."""

    index: int
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class LoadedModel:
    """A model a backend holds ready (in memory, or as a loaded SGLang adapter)."""

    id: str
    kind: ModelKind
    size_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class InferenceBackend(Protocol):
    """Serves chat and text completions for resolved models; implementations never block the event loop."""

    name: str

    async def generate(self, model: ResolvedModel, prompt: Prompt, params: SamplingParams) -> Generation:
        """Returns the finished generation (chat when ``prompt`` is a message list)."""
        ...

    def stream(self, model: ResolvedModel, prompt: Prompt, params: SamplingParams) -> AsyncIterator[Delta]:
        """Yields pieces of text as they are generated, ending each choice with a finish reason."""
        ...

    def loaded_models(self) -> list[LoadedModel]:
        """Returns the models held ready right now."""
        ...

    async def aclose(self) -> None:
        """Releases connections and memory."""
        ...
