"""Uploads a generated 500 MB valid JSONL file to a running `tuneyard api` and prints its peak RSS increase.

    python bench/upload_rss.py [--mb 500] [--mode raw|multipart|both]

Starts `tuneyard api` as a subprocess on a fresh embedded data dir (SQLite, filesystem broker),
creates a key, streams the body from a generator (the client never holds the file either), and
reads the server's VmHWM (peak resident set) from /proc before and after. The acceptance bar is
an increase under 100 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx

LIMIT_MB = 100
REPO = Path(__file__).resolve().parents[1]


def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak(pid: int) -> bool:
    """Resets VmHWM to the current RSS (Linux ≥ 4.0, own processes); False if not permitted."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def jsonl_chunks(total_bytes: int, chunk_records: int = 512) -> Iterator[bytes]:
    """Yields valid SFT records until about `total_bytes` have been produced."""
    sent = 0
    i = 0
    while sent < total_bytes:
        lines = []
        for _ in range(chunk_records):
            record = {"messages": [{"role": "user", "content": f"question {i} " + "lorem ipsum " * 20},
                                   {"role": "assistant", "content": f"answer {i} " + "dolor sit " * 20}]}
            lines.append(json.dumps(record))
            i += 1
        chunk = ("\n".join(lines) + "\n").encode()
        sent += len(chunk)
        yield chunk


def multipart_chunks(total_bytes: int, boundary: str) -> Iterator[bytes]:
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
           f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
           "Content-Type: application/jsonl\r\n\r\n").encode()
    yield from jsonl_chunks(total_bytes)
    yield f"\r\n--{boundary}--\r\n".encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(base: str, pid: int, headers: dict[str, str], mode: str, total: int) -> tuple[float, float, dict]:
    """Returns (peak RSS increase MB, seconds, response JSON) for one streamed upload."""
    httpx.get(f"{base}/v1/datasets", headers=headers).raise_for_status()  # warm up imports and the pool
    exact = reset_peak(pid)
    before = vm_kib(pid, "VmRSS" if exact else "VmHWM")
    start = time.monotonic()
    if mode == "raw":
        body, content_type = jsonl_chunks(total), "application/jsonl"
    else:
        boundary = uuid.uuid4().hex
        body, content_type = multipart_chunks(total, boundary), f"multipart/form-data; boundary={boundary}"
    response = httpx.post(f"{base}/v1/datasets", content=body, timeout=600,
                          headers={**headers, "Content-Type": content_type})
    elapsed = time.monotonic() - start
    response.raise_for_status()
    peak = vm_kib(pid, "VmHWM")
    return (peak - before) / 1024, elapsed, response.json()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=500)
    parser.add_argument("--mode", choices=["raw", "multipart", "both"], default="both")
    args = parser.parse_args()
    total = args.mb * 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="tuneyard-bench-") as tmp:
        env = {**os.environ, "TUNEYARD_DATA_DIR": tmp, "TUNEYARD_MAX_UPLOAD_BYTES": str(4 * total),
               "PYTHONPATH": str(REPO)}
        cli = [sys.executable, "-m", "tuneyard_cli"]
        subprocess.run([*cli, "migrate"], env=env, check=True, capture_output=True)
        created = subprocess.run([*cli, "keys", "create", "--team", "bench"], env=env, check=True,
                                 capture_output=True, text=True)
        headers = {"Authorization": f"Bearer {created.stdout.strip().splitlines()[-1]}"}
        port = free_port()
        api = subprocess.Popen([*cli, "api", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(100):
                try:
                    httpx.get(f"{base}/healthz").raise_for_status()
                    break
                except httpx.HTTPError:
                    time.sleep(0.2)
            worst = 0.0
            for mode in (["raw", "multipart"] if args.mode == "both" else [args.mode]):
                increase, seconds, dataset = measure(base, api.pid, headers, mode, total)
                worst = max(worst, increase)
                mib = dataset["size_bytes"] / 2**20
                print(f"{mode:9s} upload of {mib:.0f} MiB in {seconds:.1f}s ({mib / seconds:.0f} MiB/s): "
                      f"API peak RSS +{increase:.1f} MB (RSS now {vm_kib(api.pid, 'VmRSS') / 1024:.0f} MB)")
        finally:
            api.terminate()
            api.wait(15)
    verdict = "PASS" if worst < LIMIT_MB else "FAIL"
    print(f"{verdict}: largest peak RSS increase {worst:.1f} MB (limit {LIMIT_MB} MB)")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())
