"""The callback interface through which a training run reports what happens.

The worker hands the trainer a reporter that writes to the database; tests hand it a
`RecordingReporter`. The trainer never knows which.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

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


class StopRequested(Exception):
    """Raised inside a step (between micro-batches, while sampling rollouts) once ``should_stop`` is
    true: a cancel, or a lease another attempt took, must not wait for a step that may never end."""


def raise_if_stopping(should_stop: Callable[[], bool] | None) -> None:
    """Raises StopRequested when ``should_stop`` says so (None: never)."""
    if should_stop is not None and should_stop():
        raise StopRequested


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


class SilentReporter:
    """Records nothing and never asks to stop: the reporter of every rank but 0 (rank 0 reports)."""

    def on_metrics(self, stage_index: int, step: int, split: str, values: dict[str, float]) -> None:
        """Rank 0 reports the step's metrics, already summed over every rank."""

    def on_event(self, kind: str, message: str, data: dict | None = None) -> None:
        """Rank 0 reports events."""

    def on_checkpoint(self, info: CheckpointInfo) -> None:
        """Rank 0 writes and reports checkpoints."""

    def on_checkpoint_removed(self, path: Path) -> None:
        """Rank 0 prunes checkpoints."""

    def should_stop(self) -> bool:
        return False


class JsonlReporter:
    """Appends every report as a JSON line to a file; asks to stop once ``stop_file`` exists.

    Rank 0 of a run the worker launched as child processes reports through it; the worker replays
    the lines into its own reporter (``replay_reports``) and creates ``stop_file`` to ask for a stop.
    """

    def __init__(self, path: Path, stop_file: Path) -> None:
        self.path, self.stop_file = path, stop_file

    def _write(self, record: dict[str, Any]) -> None:
        # One write per line, flushed at once: the reader sees whole lines as they happen.
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def on_metrics(self, stage_index: int, step: int, split: str, values: dict[str, float]) -> None:
        self._write({"type": "metrics", "stage_index": stage_index, "step": step, "split": split,
                     "values": values})

    def on_event(self, kind: str, message: str, data: dict | None = None) -> None:
        self._write({"type": "event", "kind": kind, "message": message, "data": data})

    def on_checkpoint(self, info: CheckpointInfo) -> None:
        self._write({"type": "checkpoint", "info": {**asdict(info), "path": str(info.path)}})

    def on_checkpoint_removed(self, path: Path) -> None:
        self._write({"type": "checkpoint_removed", "path": str(path)})

    def should_stop(self) -> bool:
        return self.stop_file.exists()


def replay_reports(lines: list[str], reporter: Reporter) -> None:
    """Hands each JSON line a ``JsonlReporter`` wrote to ``reporter``, in order."""
    for line in lines:
        record = json.loads(line)
        kind = record["type"]
        if kind == "metrics":
            reporter.on_metrics(record["stage_index"], record["step"], record["split"], record["values"])
        elif kind == "event":
            reporter.on_event(record["kind"], record["message"], record["data"])
        elif kind == "checkpoint":
            info = record["info"]
            reporter.on_checkpoint(CheckpointInfo(**{**info, "path": Path(info["path"]),
                                                     "files": [FileEntry(**f) for f in info["files"]]}))
        elif kind == "checkpoint_removed":
            reporter.on_checkpoint_removed(Path(record["path"]))
        else:
            raise ValueError(f"unknown report type {kind!r}")
