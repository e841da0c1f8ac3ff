"""The callback interface through which a training run reports what happens.

The worker hands the trainer a reporter that writes to the database; tests hand it a
`RecordingReporter`. The trainer never knows which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

CheckpointKind = Literal["resume", "adapter", "merged", "reward_model"]


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the checkpoint folder, '/'-separated
    size: int
    sha256: str


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint folder on disk (its manifest is written and the folder renamed)."""

    stage_index: int
    step: int
    kind: CheckpointKind
    path: Path
    files: list[FileEntry]
    metrics: dict[str, float] = field(default_factory=dict)
    is_best: bool = False


class Reporter(Protocol):
    def on_metrics(self, stage_index: int, step: int, split: str, values: dict[str, float]) -> None:
        """Called once per optimizer step (split 'train') and per evaluation (split 'eval')."""

    def on_event(self, kind: str, message: str, data: dict | None = None) -> None:
        """Stage start/end, resume, checkpoint pruning, warnings."""

    def on_checkpoint(self, info: CheckpointInfo) -> None:
        """A checkpoint folder became complete."""

    def on_checkpoint_removed(self, path: Path) -> None:
        """Retention deleted a checkpoint folder that was reported earlier."""

    def should_stop(self) -> bool:
        """Checked every step; True asks the loop to save and return."""


@dataclass
class RecordingReporter:
    """Keeps everything in lists; `stop_after_steps` makes should_stop fire after N train steps."""

    stop_after_steps: int | None = None
    metrics: list[tuple[int, int, str, dict[str, float]]] = field(default_factory=list)
    events: list[tuple[str, str, dict | None]] = field(default_factory=list)
    checkpoints: list[CheckpointInfo] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)

    def on_metrics(self, stage_index: int, step: int, split: str, values: dict[str, float]) -> None:
        self.metrics.append((stage_index, step, split, dict(values)))

    def on_event(self, kind: str, message: str, data: dict | None = None) -> None:
        self.events.append((kind, message, data))

    def on_checkpoint(self, info: CheckpointInfo) -> None:
        self.checkpoints.append(info)

    def on_checkpoint_removed(self, path: Path) -> None:
        self.removed.append(path)

    def should_stop(self) -> bool:
        if self.stop_after_steps is None:
            return False
        return sum(1 for m in self.metrics if m[2] == "train") >= self.stop_after_steps

    def train_series(self, name: str, stage_index: int | None = None) -> list[float]:
        """Returns the values of one train metric in step order."""
        return [
            v[name]
            for s, _, split, v in self.metrics
            if split == "train" and name in v and (stage_index is None or s == stage_index)
        ]
