"""Run a Python script with a folder that is a really full disk: a tiny tmpfs in a private mount namespace.

`unshare --user --map-root-user --mount` gives the child its own mount table without privileges on
the host, so a `size=` tmpfs can be mounted over a folder for that child only. Writes past the size
fail with ENOSPC exactly as on a full volume. Tests that need it skip where user namespaces are off.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def require_unshare() -> None:
    """Skips the calling test where unprivileged user and mount namespaces are unavailable."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux `unshare` to mount a small tmpfs")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"user/mount namespaces are unavailable here: {probe.stderr.decode().strip()}")


def run_on_small_disk(script: str, mount: Path, size_bytes: int, env: dict[str, str],
                      timeout: float = 240) -> dict[str, Any]:
    """Returns the JSON the script printed last, run with `mount` being a tmpfs of `size_bytes`."""
    require_unshare()
    mount.mkdir(parents=True, exist_ok=True)
    command = f'mount -t tmpfs -o size={size_bytes} tmpfs "{mount}" && exec "{sys.executable}" -c "$0"'
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", command, script],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"script failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                             f"{done.stderr[-5000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
