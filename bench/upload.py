"""Dataset upload and validation: MB/s and peak RSS, through the library and through the service.

    .venv/bin/python bench/upload.py [--size-mb 1024] [--rounds 2] [--skip-service]

1. A JSONL file of SFT chat records is generated streamed to disk (cycling a pool of distinct
   records, so generating costs almost nothing and nothing large is held in memory).
2. Library, each pass a fresh subprocess, alternating: `validate_jsonl` as shipped (orjson), the
   same function with the stdlib `json` parser swapped in (the baseline), and reading the lines
   alone (`readlines`, the I/O ceiling). Prints MB/s and each subprocess's peak RSS (VmHWM).
3. Service: `tuneyard api` and a `tuneyard worker -Q cpu` on PostgreSQL + Redis; the file is
   streamed as a raw `application/jsonl` body to POST /v1/datasets, then GET /v1/datasets/{id}
   is polled until validation ends. Prints upload MB/s, validation MB/s (from the end of the
   upload to `ready`) and the peak RSS growth of the API and of the worker (its pool children
   included), sampled every 50 ms from /proc and, where the kernel allows it, from VmHWM.
MB = 10^6 bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from common import (
    REPO_ROOT,
    free_port,
    fresh_database,
    header,
    median,
    proc_status_kib,
    tree_pids,
    wait_for_port,
)

MB = 1_000_000
TARGET_MB_S, TARGET_RSS_MB = 100.0, 100.0
PASSES = ["orjson", "stdlib_json", "read_only"]


def record_pool(size: int = 4096, seed: int = 0) -> list[bytes]:
    """Returns `size` distinct JSONL lines: chat records of 1-3 exchanges, 200 B to ~6 KB each."""
    import orjson

    rng = random.Random(seed)
    words = "the model answer question explain data token train value step result because first".split()
    lines = []
    for i in range(size):
        messages = [{"role": "system", "content": "You are a helpful assistant."}] if i % 5 == 0 else []
        for _ in range(rng.choice([1, 1, 2, 3])):
            messages.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(5, 120)))})
            messages.append(
                {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(5, 300)))}
            )
        lines.append(orjson.dumps({"messages": messages}) + b"\n")
    return lines


def write_jsonl(path: Path, size_bytes: int) -> int:
    """Writes about `size_bytes` of JSONL to `path` in 1 MB chunks; returns the bytes written."""
    pool = record_pool()
    written, i = 0, 0
    with open(path, "wb") as out:
        while written < size_bytes:
            chunk = bytearray()
            while len(chunk) < MB:
                chunk += pool[i % len(pool)]
                i += 1
            out.write(chunk)
            written += len(chunk)
    return written


def validate_pass(path: Path, kind: str) -> dict:
    """Validates (or just reads) the file in this process; returns seconds, records and peak RSS."""
    from trainer_core.data import validate

    if kind == "stdlib_json":
        validate.orjson = _StdlibJson  # the same validation with the stdlib parser
    start = time.perf_counter()
    with open(path, "rb") as stream:
        if kind == "read_only":
            records = sum(1 for _ in stream)
            ok = True
        else:
            report = validate.validate_jsonl(stream, "sft")
            records, ok = report.num_records, report.ok
    seconds = time.perf_counter() - start
    return {
        "kind": kind,
        "seconds": seconds,
        "records": records,
        "ok": ok,
        "peak_rss_mb": proc_status_kib(os.getpid(), "VmHWM") * 1024 / MB,
    }


class _StdlibJson:
    loads = staticmethod(json.loads)
    JSONDecodeError = json.JSONDecodeError


def run_pass(path: Path, kind: str) -> dict:
    cmd = [sys.executable, __file__, "--pass", kind, "--file", str(path)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


class RssSampler(threading.Thread):
    """Samples the summed VmRSS of a process tree every `interval` seconds; keeps the maximum."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_kib = 0
        self._done = threading.Event()

    def current_kib(self) -> int:
        total = 0
        for pid in tree_pids(self.pid):
            try:
                total += proc_status_kib(pid, "VmRSS")
            except (OSError, KeyError):
                continue
        return total

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.peak_kib = max(self.peak_kib, self.current_kib())

    def stop(self) -> int:
        self._done.set()
        self.join()
        return max(self.peak_kib, self.current_kib())


def reset_peaks(pid: int) -> None:
    """Resets VmHWM to the current RSS for a process tree (Linux >= 4.0); ignored where refused."""
    for each in tree_pids(pid):
        with contextlib.suppress(OSError):  # the process may have exited since it was listed
            Path(f"/proc/{each}/clear_refs").write_text("5")


def hwm_kib(pid: int) -> int:
    return sum(proc_status_kib(p, "VmHWM") for p in tree_pids(pid))


def file_chunks(path: Path, chunk: int = MB) -> Iterator[bytes]:
    with open(path, "rb") as stream:
        while data := stream.read(chunk):
            yield data


def start_service(url: str, data_dir: Path) -> tuple[subprocess.Popen, subprocess.Popen, int, str]:
    """Returns (api, worker, api port, API key) of a running service on the database `url`."""
    from sqlalchemy.orm import sessionmaker

    from app.db.session import create_db_engine
    from app.services.auth import create_api_key

    engine = create_db_engine(url)
    with sessionmaker(bind=engine)() as session:
        _, key = create_api_key(session, "bench")
    engine.dispose()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEYARD_")}
    env.update(
        TUNEYARD_DATABASE_URL=url,
        TUNEYARD_BROKER_URL=f"redis://127.0.0.1:6379/{14}",
        TUNEYARD_DATA_DIR=str(data_dir),
        TUNEYARD_MAX_UPLOAD_BYTES=str(64 * 1024**3),
        PYTHONUNBUFFERED="1",
    )
    port = free_port()
    log = open(data_dir / "services.log", "ab")  # noqa: SIM115 - lives as long as the processes
    cli = [sys.executable, "-m", "tuneyard_cli"]
    api = subprocess.Popen([*cli, "api", "--port", str(port)], cwd=REPO_ROOT, env=env, stdout=log, stderr=log)
    worker = subprocess.Popen(
        [*cli, "worker", "--queues", "cpu", "--concurrency", "1"],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=log,
    )
    wait_for_port(port)
    return api, worker, port, key


def service_round(
    path: Path, size: int, port: int, key: str, api_pid: int, worker_pid: int, settle: float
) -> dict:
    import httpx

    base, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
    httpx.get(f"{base}/v1/datasets", headers=headers, timeout=30).raise_for_status()
    time.sleep(settle)  # let the worker settle (its pool child is forked fresh per task)
    reset_peaks(api_pid)
    reset_peaks(worker_pid)
    samplers = {"api": RssSampler(api_pid), "worker": RssSampler(worker_pid)}
    before = {name: s.current_kib() for name, s in samplers.items()}
    hwm_before = {"api": hwm_kib(api_pid), "worker": hwm_kib(worker_pid)}
    for sampler in samplers.values():
        sampler.start()
    start = time.perf_counter()
    response = httpx.post(
        f"{base}/v1/datasets?format=sft&name=bench",
        content=file_chunks(path),
        timeout=3600,
        headers={**headers, "Content-Type": "application/jsonl"},
    )
    uploaded = time.perf_counter()
    response.raise_for_status()
    dataset = response.json()
    while dataset["status"] == "validating":
        time.sleep(0.1)
        dataset = httpx.get(f"{base}/v1/datasets/{dataset['id']}", headers=headers, timeout=30).json()
    validated = time.perf_counter()
    peaks = {name: s.stop() for name, s in samplers.items()}
    return {
        "upload_s": uploaded - start,
        "validate_s": validated - uploaded,
        "status": dataset["status"],
        "records": dataset["num_records"],
        "size": size,
        "api_growth_mb": (peaks["api"] - before["api"]) * 1024 / MB,
        "worker_growth_mb": (peaks["worker"] - before["worker"]) * 1024 / MB,
        "api_hwm_growth_mb": (hwm_kib(api_pid) - hwm_before["api"]) * 1024 / MB,
        "api_rss_mb": before["api"] * 1024 / MB,
        "worker_rss_mb": before["worker"] * 1024 / MB,
    }


def library_bench(path: Path, size: int, rounds: int) -> None:
    results: dict[str, list[dict]] = {kind: [] for kind in PASSES}
    for _ in range(rounds):
        for kind in PASSES:
            r = run_pass(path, kind)
            results[kind].append(r)
            print(
                f"  {kind:<12} {size / MB / r['seconds']:>7.1f} MB/s  ({r['records']:,} records, "
                f"ok={r['ok']}, "
                f"peak RSS {r['peak_rss_mb']:.0f} MB)",
                flush=True,
            )
    rate = {k: median([size / MB / r["seconds"] for r in rs]) for k, rs in results.items()}
    print(
        f"validate_jsonl (median): orjson {rate['orjson']:.1f} MB/s, "
        f"stdlib json {rate['stdlib_json']:.1f} MB/s "
        f"({rate['orjson'] / rate['stdlib_json']:.2f}x), reading lines alone {rate['read_only']:.0f} MB/s "
        f"(validation at {rate['orjson'] / rate['read_only']:.0%} of it)"
    )
    print(
        f"target validation >= {TARGET_MB_S:g} MB/s: {'MET' if rate['orjson'] >= TARGET_MB_S else 'MISSED'}; "
        f"validator peak RSS {median([r['peak_rss_mb'] for r in results['orjson']]):.0f} MB for a "
        f"{size / MB:.0f} MB file"
    )


def service_bench(path: Path, size: int, rounds: int, settle: float) -> None:
    with (
        tempfile.TemporaryDirectory(prefix="tuneyard-bench-") as tmp,
        fresh_database(f"tuneyard_bench_upload_{os.getpid()}") as url,
    ):
        api, worker, port, key = start_service(url, Path(tmp))
        try:
            time.sleep(3 * settle)  # the worker connects to the broker
            for _ in range(rounds):
                r = service_round(path, size, port, key, api.pid, worker.pid, settle)
                print(
                    f"  upload {size / MB / r['upload_s']:.1f} MB/s ({r['upload_s']:.1f}s), validation "
                    f"{size / MB / r['validate_s']:.1f} MB/s ({r['validate_s']:.1f}s) -> {r['status']}, "
                    f"{r['records']:,} records",
                    flush=True,
                )
                print(
                    f"  peak RSS growth: API +{r['api_growth_mb']:.1f} MB sampled "
                    f"(+{r['api_hwm_growth_mb']:.1f} MB VmHWM; was {r['api_rss_mb']:.0f} MB), "
                    "worker incl. pool child "
                    f"+{r['worker_growth_mb']:.1f} MB sampled (was {r['worker_rss_mb']:.0f} MB)",
                    flush=True,
                )
                worst = max(r["api_growth_mb"], r["api_hwm_growth_mb"], r["worker_growth_mb"])
                print(
                    f"  target RSS growth < {TARGET_RSS_MB:g} MB: "
                    f"{'MET' if worst < TARGET_RSS_MB else 'MISSED'}"
                )
        finally:
            for process in (api, worker):
                process.terminate()
                process.wait(timeout=30)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=1024, help="file size in MB (10^6 bytes)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-service", action="store_true", help="library figures only")
    parser.add_argument("--skip-library", action="store_true", help="service figures only")
    parser.add_argument("--smoke", action="store_true", help="a few MB to check the script works")
    parser.add_argument("--pass", dest="pass_kind", choices=PASSES, help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pass_kind:
        print(json.dumps(validate_pass(args.file, args.pass_kind)))
        return
    if args.smoke:
        args.size_mb, args.rounds = 4, 1
    print(header(f"upload ({args.size_mb} MB JSONL)"))
    with tempfile.TemporaryDirectory(prefix="tuneyard-bench-") as tmp:
        path = Path(tmp) / "upload.jsonl"
        started = time.perf_counter()
        size = write_jsonl(path, args.size_mb * MB)
        print(f"generated {size / MB:.0f} MB in {time.perf_counter() - started:.1f}s")
        if not args.skip_library:
            print("library (fresh process per pass, alternating):")
            library_bench(path, size, args.rounds)
        if not args.skip_service:
            print("service (tuneyard api + tuneyard worker -Q cpu, PostgreSQL, Redis):")
            service_bench(path, size, args.rounds, settle=0.0 if args.smoke else 1.0)
    print(f"finished: {header('end').splitlines()[1]}")


if __name__ == "__main__":
    main()
