"""Blob storage: a small interface and a local-folder implementation.

Writes go to a temporary name, are hashed while streamed and renamed atomically when complete,
so a reader never sees a half-written blob and an aborted upload leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import AsyncIterable, Iterable
from pathlib import Path
from typing import BinaryIO, Protocol

from app.ids import new_id

TMP_DIR = ".tmp"


class UnsafeKey(ValueError):
    """A blob key that could escape the store (absolute, `..`, backslash, empty segment)."""


class BlobTooLarge(Exception):
    """A streamed write went past its size limit; the temporary file is already removed."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"blob is larger than the limit of {max_bytes} bytes")
        self.max_bytes = max_bytes


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
        self._file: BinaryIO | None = open(tmp_path, "wb")  # noqa: SIM115 - closed in commit/abort
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        assert self._file is not None, "writer is closed"
        self.size += len(chunk)
        if self._max is not None and self.size > self._max:
            self.abort()
            raise BlobTooLarge(self._max)
        self._hash.update(chunk)
        self._file.write(chunk)

    def commit(self) -> tuple[int, str]:
        """Returns (size, sha256 hex) after fsync and atomic rename to the final key."""
        assert self._file is not None, "writer is closed"
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        self._final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._tmp, self._final)
        return self.size, self._hash.hexdigest()

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
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
