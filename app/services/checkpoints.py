"""Checkpoints: registered by workers as folders become complete, listed, downloaded, archived.

Retention happens in storage first (the trainer deletes the folder) and is mirrored here by
setting `deleted_at`; a deleted checkpoint is no longer listed or downloadable. Among a stage's
live resume checkpoints the one with the lowest `eval_loss` is marked `is_best`, the same rule
the trainer's retention uses to keep it.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Checkpoint, Run, Team, utcnow
from app.errors import NotFound
from app.ids import new_id
from app.schemas.checkpoints import CheckpointOut
from app.schemas.common import ListPage
from app.services.owned import get_owned
from app.services.pagination import paginate
from app.storage import LocalBlobStore

MANIFEST = "manifest.json"
CHUNK = 1 << 20


def register_checkpoint(session: Session, *, run_id: str, team_id: str, stage_index: int, step: int,
                        kind: str, blob_prefix: str, files: list[dict[str, Any]],
                        metrics: dict[str, Any]) -> Checkpoint:
    """Returns the live checkpoint row of a folder, inserted or refreshed (a re-export rewrites it)."""
    checkpoint = session.scalar(select(Checkpoint).where(
        Checkpoint.run_id == run_id, Checkpoint.blob_prefix == blob_prefix, Checkpoint.deleted_at.is_(None)))
    if checkpoint is None:
        checkpoint = Checkpoint(id=new_id("ckpt"), run_id=run_id, team_id=team_id, blob_prefix=blob_prefix)
        session.add(checkpoint)
    checkpoint.stage_index, checkpoint.step, checkpoint.kind = stage_index, step, kind
    checkpoint.files = files
    checkpoint.metrics = metrics
    checkpoint.size_bytes = sum(int(f["size"]) for f in files)
    checkpoint.created_at = utcnow()
    session.flush()
    if kind == "resume":
        _mark_best(session, run_id, stage_index)
    return checkpoint


def mark_checkpoint_removed(session: Session, run_id: str, blob_prefix: str) -> None:
    """Records that retention deleted the folder at `blob_prefix`."""
    row = session.scalar(select(Checkpoint).where(
        Checkpoint.run_id == run_id, Checkpoint.blob_prefix == blob_prefix, Checkpoint.deleted_at.is_(None)))
    if row is not None:
        row.deleted_at = utcnow()
        row.is_best = False
        session.flush()
        _mark_best(session, run_id, row.stage_index)


def _mark_best(session: Session, run_id: str, stage_index: int) -> None:
    live = list(session.scalars(select(Checkpoint).where(
        Checkpoint.run_id == run_id, Checkpoint.stage_index == stage_index, Checkpoint.kind == "resume",
        Checkpoint.deleted_at.is_(None))))
    scored = [(c.metrics.get("eval_loss"), c.step, c) for c in live if c.metrics.get("eval_loss") is not None]
    best = min(scored, key=lambda item: (item[0], item[1]))[2] if scored else None
    for c in live:
        c.is_best = c is best


def get_checkpoint(session: Session, team: Team, checkpoint_id: str) -> Checkpoint:
    """Returns the team's live checkpoint; 404 for a missing, deleted or another team's one."""
    checkpoint = get_owned(session, Checkpoint, team, checkpoint_id)
    if checkpoint.deleted_at is not None:
        raise NotFound(f"checkpoint {checkpoint_id} was deleted by retention (keep_checkpoints)",
                       code="checkpoint_deleted", param="checkpoint_id")
    return checkpoint


def list_checkpoints(session: Session, team: Team, run_id: str, *, limit: int,
                     after: str | None) -> ListPage[CheckpointOut]:
    """Returns the run's live checkpoints, oldest first."""
    run = get_owned(session, Run, team, run_id)
    stmt = select(Checkpoint).where(Checkpoint.run_id == run.id, Checkpoint.deleted_at.is_(None))
    rows, has_more, cursor = paginate(session, stmt, Checkpoint.id, limit=limit, after=after,
                                      newest_first=False)
    return ListPage[CheckpointOut](data=[CheckpointOut.model_validate(r) for r in rows], has_more=has_more,
                                   next_cursor=cursor)


def checkpoint_file(store: LocalBlobStore, checkpoint: Checkpoint, path: str) -> Path:
    """Returns the file of a checkpoint by its listed path (only listed files, so no path escapes)."""
    listed = {f["path"] for f in checkpoint.files} | {MANIFEST}
    if path not in listed:
        raise NotFound(f"checkpoint {checkpoint.id} has no file {path!r}", code="file_not_found",
                       param="path")
    file = store.path_for(f"{checkpoint.blob_prefix}/{path}")
    if not file.is_file():
        raise NotFound(f"file {path!r} of checkpoint {checkpoint.id} is gone from storage",
                       code="file_not_found", param="path")
    return file


def archive_chunks(store: LocalBlobStore, checkpoint: Checkpoint) -> Iterator[bytes]:
    """Yields a tar of the checkpoint folder (files under `<checkpoint id>/`) chunk by chunk.

    The tar is produced member by member — header, file content in 1 MiB reads, padding — so a
    multi-GB merged model is never held in memory.
    """
    folder = store.path_for(checkpoint.blob_prefix)
    paths = [f["path"] for f in checkpoint.files]
    if (folder / MANIFEST).is_file():
        paths.append(MANIFEST)
    for rel in paths:
        file = folder / rel
        info = tarfile.TarInfo(f"{checkpoint.id}/{rel}")
        info.size = file.stat().st_size
        info.mtime = int(file.stat().st_mtime)
        info.mode = 0o644
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        with open(file, "rb") as fh:
            while chunk := fh.read(CHUNK):
                yield chunk
        if remainder := info.size % tarfile.BLOCKSIZE:
            yield b"\0" * (tarfile.BLOCKSIZE - remainder)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)

