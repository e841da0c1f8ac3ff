"""Blob storage: a small interface and a local-folder implementation.

Writes go to a temporary name, are hashed while streamed and renamed atomically when complete,
so a reader never sees a half-written blob and an aborted upload leaves nothing behind. A process
killed mid-write cannot clean up, so temporary files older than a bound are swept (the API does it
at start-up and periodically). A full disk is a StorageFull, with the partial file removed.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import shutil
import time
from collections.abc import AsyncIterable, Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO, Protocol

from app.ids import new_id

log = logging.getLogger("tuneyard.storage")

TMP_DIR = ".tmp"
FULL_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
SWEEP_INTERVAL_SECONDS = 600.0


class UnsafeKey(ValueError):
    """A blob key that could escape the store (absolute, `..`, backslash, empty segment)."""


class BlobTooLarge(Exception):
    """A streamed write went past its size limit; the temporary file is already removed."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"blob is larger than the limit of {max_bytes} bytes")
        self.max_bytes = max_bytes


class StorageFull(Exception):
    """The storage volume (or the quota on it) is full; nothing partial was left behind."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("the storage volume is full" + (f" ({detail})" if detail else ""))


def is_disk_full(exc: BaseException | None) -> bool:
    """Returns whether an error (or one it was raised from) is the disk or quota running out of space."""
    while exc is not None:
        if isinstance(exc, StorageFull) or (isinstance(exc, OSError) and exc.errno in FULL_DISK_ERRNOS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextmanager
def full_disk_as_storage_full(cleanup: Callable[[], None]) -> Iterator[None]:
    """Runs `cleanup` and raises StorageFull when the body runs out of disk space."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in FULL_DISK_ERRNOS:
            raise
        cleanup()
        raise StorageFull(os.strerror(exc.errno)) from exc


def check_key(key: str) -> str:
    """Returns the key if it is a safe relative path of `/`-separated plain segments."""
    if not key or "\\" in key or "\x00" in key or key.startswith("/"):
        raise UnsafeKey(f"unsafe blob key {key!r}")
    for segment in key.split("/"):
        if segment in ("", ".", "..") or segment.startswith(TMP_DIR):
            raise UnsafeKey(f"unsafe blob key {key!r}")
    return key


class BlobWriter:
    """Receives chunks of one blob; `commit()` publishes it, `abort()` (or an exception) removes it."""

    def __init__(self, tmp_path: Path, final_path: Path, max_bytes: int | None) -> None:
        self._tmp = tmp_path
        self._final = final_path
        self._max = max_bytes
        self._file: BinaryIO | None = None
        with full_disk_as_storage_full(self.abort):
            self._file = open(tmp_path, "wb")  # noqa: SIM115 - closed in commit/abort
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        assert self._file is not None, "writer is closed"
        self.size += len(chunk)
        if self._max is not None and self.size > self._max:
            self.abort()
            raise BlobTooLarge(self._max)
        self._hash.update(chunk)
        with full_disk_as_storage_full(self.abort):
            self._file.write(chunk)

    def commit(self) -> tuple[int, str]:
        """Returns (size, sha256 hex) after fsync and atomic rename to the final key."""
        assert self._file is not None, "writer is closed"
        with full_disk_as_storage_full(self.abort):
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            self._final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._tmp, self._final)
        return self.size, self._hash.hexdigest()

    def abort(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            # Flushing the buffer fails again on a full disk; the file is removed just below anyway.
            with suppress(OSError):
                file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None or self._file is not None:
            self.abort()


class BlobStore(Protocol):
    def writer(self, key: str, max_bytes: int | None = None) -> BlobWriter: ...
    def write_bytes(self, key: str, data: bytes) -> tuple[int, str]: ...
    def write_iter(
        self, key: str, chunks: Iterable[bytes], max_bytes: int | None = None
    ) -> tuple[int, str]: ...
    async def write_stream(
        self, key: str, chunks: AsyncIterable[bytes] | Iterable[bytes], max_bytes: int | None = None
    ) -> tuple[int, str]: ...
    def open(self, key: str) -> BinaryIO: ...
    def read_bytes(self, key: str) -> bytes: ...
    def path_for(self, key: str) -> Path: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> None: ...


class LocalBlobStore:
    """Blobs as files under `root`; keys are relative paths."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        (self.root / TMP_DIR).mkdir(parents=True, exist_ok=True)

    def path_for(self, key: str) -> Path:
        """Returns the file path of a key (for FileResponse and workers that read files)."""
        return self.root / check_key(key)

    def writer(self, key: str, max_bytes: int | None = None) -> BlobWriter:
        final = self.path_for(key)
        tmp = self.root / TMP_DIR / new_id("part")
        return BlobWriter(tmp, final, max_bytes)

    def write_bytes(self, key: str, data: bytes) -> tuple[int, str]:
        return self.write_iter(key, [data])

    def write_iter(self, key: str, chunks: Iterable[bytes], max_bytes: int | None = None) -> tuple[int, str]:
        with self.writer(key, max_bytes) as out:
            for chunk in chunks:
                out.write(chunk)
            return out.commit()

    async def write_stream(
        self, key: str, chunks: AsyncIterable[bytes] | Iterable[bytes], max_bytes: int | None = None
    ) -> tuple[int, str]:
        """Returns (size, sha256) of a blob written from sync or async chunks; raises BlobTooLarge."""
        if not isinstance(chunks, AsyncIterable):
            return self.write_iter(key, chunks, max_bytes)
        with self.writer(key, max_bytes) as out:
            async for chunk in chunks:
                out.write(chunk)
            return out.commit()

    def open(self, key: str) -> BinaryIO:
        return open(self.path_for(key), "rb")  # noqa: SIM115 - the caller closes it

    def read_bytes(self, key: str) -> bytes:
        return self.path_for(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self.path_for(key).is_file()

    def delete(self, key: str) -> None:
        self.path_for(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        """Removes every blob under a folder key (e.g. a checkpoint folder)."""
        path = self.path_for(prefix.rstrip("/"))
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def sweep_tmp(root: Path, max_age_seconds: float) -> int:
    """Returns how many temporary entries older than `max_age_seconds` were removed from the store."""
    cutoff = time.time() - max_age_seconds
    removed = 0
    for entry in (Path(root) / TMP_DIR).iterdir():
        try:
            if entry.lstat().st_mtime >= cutoff:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed += 1
        except FileNotFoundError:  # another process swept or committed it meanwhile
            continue
    return removed


async def sweep_tmp_forever(store: LocalBlobStore, max_age_seconds: float) -> None:
    """Sweeps the store's temporary files now and then every few minutes, until cancelled.

    A file being written has a fresh modification time, so only abandoned ones are old.
    """
    interval = min(SWEEP_INTERVAL_SECONDS, max_age_seconds)
    while True:
        try:
            removed = await asyncio.to_thread(sweep_tmp, store.root, max_age_seconds)
        except OSError:
            log.exception("sweeping %s failed; retrying in %.0f s", store.root / TMP_DIR, interval)
        else:
            if removed:
                log.info("swept %d temporary file(s) older than %.0f s from %s", removed, max_age_seconds,
                         store.root / TMP_DIR)
        await asyncio.sleep(interval)
