"""Folders written under a temporary name and published by rename: never half-written, never left over."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Less free space than this when a write failed means the disk filled up. torch.save reports a full
# disk as an opaque RuntimeError ("unexpected pos ..."), so the volume itself is asked.
FULL_BELOW_BYTES = 1024 * 1024


@contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """Yields a fresh ``<final>.tmp`` folder to write into; removes it when writing fails.

    A failure on a full disk is raised as ``OSError(ENOSPC)`` (chained to the original error),
    so callers can tell "the storage is full" from a bug; nothing half-written is left behind.
    """
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except Exception as exc:
        full = shutil.disk_usage(tmp).free < FULL_BELOW_BYTES
        shutil.rmtree(tmp, ignore_errors=True)
        if full and not (isinstance(exc, OSError) and exc.errno == errno.ENOSPC):
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} while writing {final}") from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
