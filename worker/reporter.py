"""The reporter a worker hands to `trainer_core`: metrics, events and checkpoints into the database.

Metrics are buffered and written in batches (every `flush_rows` points or `flush_seconds`), each
batch one transaction that starts with the attempt's fence and upserts rows keyed by
(run, stage, step, split) — so a resumed attempt rewriting steps after its checkpoint leaves no
duplicates. A write refused by the fence raises `StaleAttempt` out of the training loop.

Event text is for people, so stages are numbered from 1 there ("stage 1/2 (sft) started", as the
dashboard and the client show them); `data.stage_index` stays the API's 0-based index.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Checkpoint, RunStage, utcnow
from app.jobs.lease import Claim, Lease, add_event, fence
from app.jobs.states import RUN
from app.services.checkpoints import MANIFEST, mark_checkpoint_removed, register_checkpoint
from app.services.metrics import ETA_WINDOW, MetricPoint, seconds_per_step, upsert_metrics
from trainer_core.reporting import CheckpointInfo

log = logging.getLogger("tuneyard.worker.reporter")


def finite_values(values: dict[str, Any]) -> dict[str, float | None]:
    """Returns the values as floats with NaN/inf as None (JSON columns cannot store them)."""
    out: dict[str, float | None] = {}
    for name, value in values.items():
        number = float(value)
        out[name] = number if math.isfinite(number) else None
    return out


def _json_safe(data: dict | None) -> dict | None:
    return None if data is None else json.loads(json.dumps(data, default=str))


def stage_label(index: int, num_stages: int | None, method: str | None = None) -> str:
    """Returns how people see a stage: "stage 1/2 (sft)" for index 0 of two (1-based, as shown everywhere)."""
    label = f"stage {index + 1}/{num_stages}" if num_stages else f"stage {index + 1}"
    return f"{label} ({method})" if method else label


def event_text(kind: str, message: str, data: dict[str, Any], num_stages: int | None) -> str:
    """Returns the event's text with its stage numbered from 1 (the trainer numbers from 0)."""
    index = data.get("stage_index")
    if index is None:
        return message
    label = stage_label(int(index), num_stages, data.get("method"))
    if kind in ("stage_started", "stage_finished"):
        return f"{label} {kind.removeprefix('stage_')}"
    if kind == "resumed":
        return f"resumed from {label} step {data.get('step')}"
    return message


def complete_folders(work_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Returns (folder, manifest) of the complete checkpoint and export folders of a run's work_dir.

    Folders are renamed into place with their manifest already written, so a final name with a
    manifest means complete; `*.tmp` folders are ignored.
    """
    found = []
    for folder in sorted([*work_dir.glob("stage-*/checkpoint-*"), *work_dir.glob("export/*")]):
        manifest = folder / MANIFEST
        if folder.name.endswith(".tmp") or not manifest.is_file():
            continue
        found.append((folder, json.loads(manifest.read_text())))
    return found


class DbReporter:
    """Writes one attempt's reports; every transaction is fenced by the attempt number."""

    def __init__(self, sessions: sessionmaker[Session], store_root: Path, claim: Claim, team_id: str,
                 lease: Lease, *, num_stages: int | None = None, flush_rows: int = 64,
                 flush_seconds: float = 0.5) -> None:
        self._sessions = sessions
        self._root = store_root.resolve()
        self.run_id = claim.job_id
        self.attempt = claim.attempt
        self.resume_reason = claim.resume_reason
        self.team_id = team_id
        self.lease = lease
        self.num_stages = num_stages
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self._buffer: list[MetricPoint] = []
        self._last_flush = time.monotonic()
        # Latest train and eval values per stage: the "metrics at that step" of exports.
        self.latest: dict[int, dict[str, float | None]] = {}
        # The newest train (step, reported at) per stage: the stage's speed for the ETA.
        self._recent: dict[int, deque[tuple[int, datetime]]] = {}

    # ------------------------------------------------------------ Reporter protocol

    def on_metrics(self, stage_index: int, step: int, split: str, values: dict[str, float]) -> None:
        clean = finite_values(values)
        self._buffer.append(MetricPoint(stage_index, step, split, clean, utcnow()))
        if split != "train":
            clean_named = {k if k.startswith("eval") else f"eval_{k}": v for k, v in clean.items()}
        else:
            clean_named = clean
        self.latest.setdefault(stage_index, {}).update(clean_named)
        if len(self._buffer) >= self.flush_rows or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def on_event(self, kind: str, message: str, data: dict | None = None) -> None:
        self.flush()
        data = _json_safe(data) or {}
        message = event_text(kind, message, data, self.num_stages)
        if kind == "resumed" and self.resume_reason:
            message = f"{message} {self.resume_reason}"
            data["reason"] = self.resume_reason
        level = "warning" if kind in ("resumed", "warning") else "info"
        with self._sessions() as session:
            fence(session, RUN, self.run_id, self.attempt)
            now = utcnow()
            index = data.get("stage_index")
            if kind == "stage_started" and index is not None:
                values = {"status": "running", "total_steps": data.get("total_steps"), "finished_at": None}
                self._update_stage(session, index, values, started_at=now)
            elif kind == "stage_finished" and index is not None:
                self._update_stage(session, index, {"status": "succeeded", "step": data.get("total_steps"),
                                                    "finished_at": now})
            add_event(session, self.run_id, self.attempt, kind, message, data or None, level)
            session.commit()

    def on_checkpoint(self, info: CheckpointInfo) -> None:
        self.flush()
        metrics = dict(info.metrics) or dict(self.latest.get(info.stage_index, {}))
        with self._sessions() as session:
            fence(session, RUN, self.run_id, self.attempt)
            checkpoint = register_checkpoint(
                session, run_id=self.run_id, team_id=self.team_id, stage_index=info.stage_index,
                step=info.step, kind=info.kind, blob_prefix=self.blob_key(info.path),
                files=[vars(f) for f in info.files], metrics=finite_values(metrics))
            add_event(session, self.run_id, self.attempt, "checkpoint_saved",
                      f"{info.kind} checkpoint of {stage_label(info.stage_index, self.num_stages)} "
                      f"at step {info.step} saved",
                      {"checkpoint_id": checkpoint.id, "stage_index": info.stage_index, "step": info.step,
                       "kind": info.kind})
            session.commit()

    def register_unrecorded_checkpoints(self, work_dir: Path) -> list[str]:
        """Returns the ids of checkpoints registered now: complete folders an earlier attempt wrote
        but did not live to register. Rows of folders retention already deleted are marked removed.

        Idempotent: a folder the database has is left as it is.
        """
        found = {self.blob_key(folder): manifest for folder, manifest in complete_folders(work_dir)}
        prefix = self.blob_key(work_dir) + "/"
        with self._sessions() as session:
            fence(session, RUN, self.run_id, self.attempt)
            live = set(session.scalars(select(Checkpoint.blob_prefix).where(
                Checkpoint.run_id == self.run_id, Checkpoint.deleted_at.is_(None))))
            registered = []
            for key, manifest in found.items():
                if key in live:
                    continue
                checkpoint = register_checkpoint(
                    session, run_id=self.run_id, team_id=self.team_id,
                    stage_index=int(manifest["stage_index"]), step=int(manifest["step"]),
                    kind=manifest["kind"], blob_prefix=key, files=list(manifest.get("files", [])),
                    metrics=finite_values(manifest.get("metrics") or {}))
                registered.append(checkpoint.id)
            for key in sorted(k for k in live - found.keys() if k.startswith(prefix)):
                mark_checkpoint_removed(session, self.run_id, key)
            if registered:
                add_event(session, self.run_id, self.attempt, "checkpoints_recovered",
                          f"registered {len(registered)} checkpoint(s) written by an earlier attempt that "
                          "ended before recording them", {"checkpoint_ids": registered}, "warning")
            session.commit()
        return registered

    def on_checkpoint_removed(self, path: Path) -> None:
        with self._sessions() as session:
            fence(session, RUN, self.run_id, self.attempt)
            mark_checkpoint_removed(session, self.run_id, self.blob_key(path))
            session.commit()

    def should_stop(self) -> bool:
        return self.lease.should_stop()

    # ------------------------------------------------------------ batching

    def flush(self) -> None:
        """Writes the buffered metric points in one fenced transaction (nothing to do when empty)."""
        self._last_flush = time.monotonic()
        if not self._buffer:
            return
        points, self._buffer = self._buffer, []
        with self._sessions() as session:
            fence(session, RUN, self.run_id, self.attempt)
            upsert_metrics(session, self.run_id, points)
            furthest: dict[int, int] = {}
            for p in points:
                if p.split == "train":
                    furthest[p.stage_index] = max(furthest.get(p.stage_index, 0), p.step)
                    self._recent.setdefault(p.stage_index, deque(maxlen=ETA_WINDOW)).append(
                        (p.step, p.created_at))
            for index, step in furthest.items():
                speed = seconds_per_step(list(self._recent[index]))
                self._update_stage(session, index, {"status": "running", "step": step,
                                                    "seconds_per_step": speed})
            session.commit()

    def blob_key(self, path: Path) -> str:
        """Returns the storage key of a folder under the blob store root."""
        return Path(path).resolve().relative_to(self._root).as_posix()

    def _update_stage(self, session: Session, index: int, values: dict[str, Any],
                      started_at: datetime | None = None) -> None:
        """Updates a stage that has not succeeded yet (a late batch never reopens a finished stage)."""
        values = {k: v for k, v in values.items() if v is not None or k == "finished_at"}
        stmt = update(RunStage).where(RunStage.run_id == self.run_id, RunStage.index == index)
        if started_at is not None:
            session.execute(stmt.where(RunStage.started_at.is_(None)).values(started_at=started_at)
                            .execution_options(synchronize_session=False))
        session.execute(stmt.where(RunStage.status != "succeeded").values(**values)
                        .execution_options(synchronize_session=False))
