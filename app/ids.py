"""Prefixed, time-sortable identifiers (`ds_…`, `run_…`, `ckpt_…`, `eval_…`)."""

from __future__ import annotations

import os
import re
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case


def _b32(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        value, rem = divmod(value, 32)
        out.append(_ALPHABET[rem])
    return "".join(reversed(out))


def new_id(prefix: str) -> str:
    """Returns `prefix_` + 10 chars of millisecond time + 16 random chars (ULID layout)."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    return f"{prefix}_{_b32(ms, 10)}{_b32(rand, 16)}"


_ID_BODY = re.compile(r"^[a-z]+_[0-9a-z]{26}$")


def is_id(value: str, prefix: str) -> bool:
    """Returns True if `value` is shaped like an id from `new_id(prefix)` (checked before a query)."""
    return value.startswith(prefix + "_") and _ID_BODY.match(value) is not None
