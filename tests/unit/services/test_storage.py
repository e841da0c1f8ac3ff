"""LocalBlobStore: safe keys, atomic streamed writes with sha256, size limit, deletes."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from app.storage import BlobTooLarge, LocalBlobStore, UnsafeKey, check_key


@pytest.mark.parametrize("key", ["", "/etc/passwd", "a/../b", "..", "a//b", "a\\b", "a/./b", "a/", ".tmp/x"])
def test_unsafe_keys_are_refused(key: str) -> None:
    with pytest.raises(UnsafeKey):
        check_key(key)


def test_stream_write_is_hashed_and_atomic(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)

    async def chunks():
        for part in (b"hello ", b"world"):
            yield part

    size, digest = asyncio.run(store.write_stream("datasets/t/a.jsonl", chunks()))
    assert (size, digest) == (11, hashlib.sha256(b"hello world").hexdigest())
    assert store.read_bytes("datasets/t/a.jsonl") == b"hello world"
    assert list((tmp_path / ".tmp").iterdir()) == []
    with store.open("datasets/t/a.jsonl") as f:
        assert f.read() == b"hello world"


def test_size_limit_removes_the_temporary_file(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    with pytest.raises(BlobTooLarge):
        store.write_iter("big", (b"x" * 100 for _ in range(10)), max_bytes=250)
    assert not store.exists("big")
    assert list((tmp_path / ".tmp").iterdir()) == []


def test_an_error_mid_stream_leaves_nothing(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)

    def chunks():
        yield b"partial"
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        store.write_iter("half", chunks())
    assert not store.exists("half") and list((tmp_path / ".tmp").iterdir()) == []


def test_delete_and_delete_prefix(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    store.write_bytes("ckpt/1/adapter.safetensors", b"a")
    store.write_bytes("ckpt/1/config.json", b"{}")
    store.write_bytes("other", b"b")
    store.delete("other")
    store.delete("other")  # idempotent
    assert not store.exists("other")
    store.delete_prefix("ckpt/1")
    assert not store.exists("ckpt/1/config.json")
    assert store.path_for("ckpt/1/x").is_relative_to(tmp_path.resolve())
