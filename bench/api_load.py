"""API load: run status and metrics polling against `tuneyard api` on PostgreSQL vs a constant endpoint.

    .venv/bin/python bench/api_load.py [--connections 100] [--duration 10] [--rounds 3] [--tool python|wrk]

Starts, on a fresh PostgreSQL database seeded with one running run (2 stages, 2,000 train steps of
10 metric values, eval every 100 steps):
- `tuneyard api` (one uvicorn process, auth on: every request resolves its Bearer key), and
- bench/ceiling_app.py, a FastAPI endpoint returning a constant, served by uvicorn the same way.
The load generator (bench/load_client.py, or wrk) is its own process. Targets, alternating round
by round, each with the same connections, warm-up and duration:
- ceiling       GET /v1/constant
- one_query     GET /v1/one_query/{id} on the ceiling app: one async SQL round trip, no auth
                (what any DB-backed endpoint costs here at least)
- run           GET /v1/runs/{id}                         (what a dashboard polls for status)
- metrics       GET /v1/runs/{id}/metrics?after_step=N    (a chart polling for its newest points)
- metrics_full  GET /v1/runs/{id}/metrics                 (a chart's first load: 13 series, ≤1000 points)
- metrics_full_uncached  the same on a second `tuneyard api` with the snapshot cache off
                (TUNEYARD_API_SNAPSHOT_SECONDS=0), one connection: a first load nobody shares
Prints req/s, p50 and p99 of each, and the ratios to the ceiling. `--profile` also samples the API
process with py-spy under the run and metrics loads and prints the hottest frames.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psutil
from common import REPO_ROOT, free_port, fresh_database, header, median, wait_for_port
from sqlalchemy.orm import sessionmaker

BENCH = Path(__file__).resolve().parent
TARGETS = ["ceiling", "one_query", "run", "metrics", "metrics_full", "metrics_full_uncached"]
RUN_SHARE, RUN_P99, METRICS_SHARE, CHART_CPU_MS = 0.50, 3.0, 0.30, 50.0
SINGLE_CONNECTION = {"metrics_full_uncached"}
TRAIN_STEPS, POLL_WINDOW = 2_000, 20


@dataclass
class Service:
    process: subprocess.Popen
    port: int


def seed(database_url: str) -> tuple[str, str]:
    """Returns (api key, run id) of a team with one running two-stage run and its metric history."""
    from app.db.models import Run, RunStage
    from app.db.session import create_db_engine
    from app.ids import new_id
    from app.services.auth import create_api_key
    from app.services.metrics import MetricPoint, upsert_metrics

    engine = create_db_engine(database_url)
    sessions = sessionmaker(bind=engine, expire_on_commit=False)
    spec = {
        "name": "bench",
        "base_model": "tiny-llama",
        "seed": 0,
        "stages": [
            {"method": "sft", "datasets": [{"id": "ds_bench"}], "epochs": 2, "batch_size": 8},
            {"method": "dpo", "datasets": [{"id": "ds_pref"}], "beta": 0.1},
        ],
    }
    start = datetime.now(UTC) - timedelta(hours=1)
    with sessions() as session:
        team, key = create_api_key(session, "bench")
        run = Run(
            id=new_id("run"),
            team_id=team.id,
            name="bench",
            status="running",
            base_model="tiny-llama",
            spec=spec,
            attempt=1,
            started_at=start,
            heartbeat_at=datetime.now(UTC),
        )
        run.stages = [
            RunStage(
                index=0,
                method="sft",
                status="running",
                step=TRAIN_STEPS,
                total_steps=4 * TRAIN_STEPS,
                started_at=start,
            ),
            RunStage(index=1, method="dpo", status="pending", step=0),
        ]
        session.add(run)
        session.commit()
        points = []
        for step in range(1, TRAIN_STEPS + 1):
            at = start + timedelta(seconds=step)
            values = {
                name: 1.0 / step + i
                for i, name in enumerate(
                    [
                        "loss",
                        "mean_token_accuracy",
                        "lr",
                        "grad_norm",
                        "num_tokens",
                        "tokens_per_second",
                        "step_time",
                        "epoch",
                        "throughput",
                        "memory_gb",
                    ]
                )
            }
            points.append(MetricPoint(0, step, "train", values, at))
            if step % 100 == 0:
                points.append(
                    MetricPoint(
                        0,
                        step,
                        "eval",
                        {"eval_loss": 2.0, "perplexity": 7.4, "eval_mean_token_accuracy": 0.4},
                        at,
                    )
                )
        for i in range(0, len(points), 500):
            upsert_metrics(session, run.id, points[i : i + 500])
        session.commit()
    engine.dispose()
    return key, run.id


SERVICE_OF = {
    "ceiling": "ceiling",
    "one_query": "ceiling",
    "run": "api",
    "metrics": "api",
    "metrics_full": "api",
    "metrics_full_uncached": "api_nocache",
}


def start_services(database_url: str, data_dir: Path, names: set[str]) -> dict[str, Service]:
    """Starts the named services (api, ceiling) and returns them once each accepts connections."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEYARD_")}
    env.update(
        TUNEYARD_DATABASE_URL=database_url,
        TUNEYARD_BROKER_URL="redis://127.0.0.1:6379/15",
        TUNEYARD_DATA_DIR=str(data_dir),
        PYTHONUNBUFFERED="1",
    )
    libpq_url = database_url.replace("postgresql+psycopg://", "postgresql://")
    commands = {
        "api": [sys.executable, "-m", "tuneyard_cli", "api"],
        "api_nocache": [sys.executable, "-m", "tuneyard_cli", "api"],
        "ceiling": [sys.executable, str(BENCH / "ceiling_app.py"), "--database-url", libpq_url],
    }
    # The same API with the snapshot cache off: what a chart's first load costs when nothing is cached.
    envs = {name: env for name in commands} | {"api_nocache": {**env, "TUNEYARD_API_SNAPSHOT_SECONDS": "0"}}
    log = open(data_dir / "services.log", "ab")  # noqa: SIM115 - closed with the processes
    services = {}
    for name, command in commands.items():
        if name not in names:
            continue
        port = free_port()
        process = subprocess.Popen(
            [*command, "--port", str(port)], cwd=REPO_ROOT, env=envs[name], stdout=log, stderr=log
        )
        services[name] = Service(process, port)
    for service in services.values():
        wait_for_port(service.port)
    return services


def stop(process: subprocess.Popen) -> None:
    """Stops a service; uvicorn waits for in-flight requests, so a stalled one is killed after 15 s."""
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def target_urls(services: dict[str, Service], run_id: str) -> dict[str, tuple[int, str]]:
    metrics = f"/v1/runs/{run_id}/metrics"
    ports = {name: services[name].port if name in services else 0
             for name in ("ceiling", "api", "api_nocache")}
    return {
        "ceiling": (ports["ceiling"], "/v1/constant"),
        "one_query": (ports["ceiling"], f"/v1/one_query/{run_id}"),
        "run": (ports["api"], f"/v1/runs/{run_id}"),
        "metrics": (ports["api"], f"{metrics}?after_step={TRAIN_STEPS - POLL_WINDOW}"),
        "metrics_full": (ports["api"], metrics),
        "metrics_full_uncached": (ports["api_nocache"], metrics),
    }


def check_targets(urls: dict[str, tuple[int, str]], auth: str) -> None:
    """Fetches each target once (also warms imports and pools); prints status and body size."""
    for name, (port, path) in urls.items():
        response = httpx.get(f"http://127.0.0.1:{port}{path}", headers={"Authorization": auth}, timeout=30)
        if response.status_code != 200:
            raise SystemExit(f"{name}: GET {path} answered {response.status_code}: {response.text[:300]}")
        print(f"  {name:<13} GET {path}  -> 200, {len(response.content):,} bytes")


def drain(port: int, path: str, auth: str) -> None:
    """Returns once the target answers a lone request (a stalled backlog must not spill into the next)."""
    httpx.get(f"http://127.0.0.1:{port}{path}", headers={"Authorization": auth}, timeout=120)


def load_python(port: int, path: str, auth: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        str(BENCH / "load_client.py"),
        "--port",
        str(port),
        "--path",
        path,
        "--header",
        f"Authorization: {auth}",
        "--connections",
        str(args.connections),
        "--warmup",
        str(args.warmup),
        "--duration",
        str(args.duration),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_wrk(port: int, path: str, auth: str, args: argparse.Namespace) -> dict:
    url = f"http://127.0.0.1:{port}{path}"
    base = ["wrk", "-t1", f"-c{args.connections}", "-H", f"Authorization: {auth}", "--latency"]
    subprocess.run([*base, f"-d{max(1, int(args.warmup))}s", url], capture_output=True, check=True)
    text = subprocess.run(
        [*base, f"-d{int(args.duration)}s", url], capture_output=True, text=True, check=True
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    timeouts = re.search(r"Socket errors:.*timeout (\d+)", text)
    return {
        "req_per_s": rate,
        "p50_ms": _wrk_ms(text, "50%"),
        "p99_ms": _wrk_ms(text, "99%"),
        "errors": int(errors.group(1)) if errors else 0,
        "timeouts": int(timeouts.group(1)) if timeouts else 0,
    }


def _wrk_ms(text: str, label: str) -> float:
    found = re.search(rf"{label}\s+([\d.]+)(us|ms|s)\b", text)
    if found is None:
        return float("nan")
    value, unit = found.groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


IDLE_LEAVES = ("Condition.wait", "Queue.get", "Event.wait", "select", "epoll", "Connection.wait", "wait_c")


def profile_api(pid: int, port: int, path: str, auth: str, args: argparse.Namespace, out: Path) -> list[str]:
    """Returns the hottest frames of the API process under load, as shares of its busy samples.

    Samples of idle threads (anyio's workers waiting for work) are left out; a frame's share is
    inclusive (the frame or anything it calls was running).
    """
    seconds = int(args.warmup + args.duration)
    spy_bin = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    cmd = [spy_bin, "record", "-p", str(pid), "-d", str(seconds), "-r", "200", "-f", "raw", "-o", str(out)]
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    load_python(port, path, auth, args)
    spy.wait(timeout=seconds + 60)
    inclusive: Counter[str] = Counter()
    busy = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if frames[-1].split(" (")[0].endswith(IDLE_LEAVES):
            continue
        busy += int(count)
        for frame in {_frame_name(f) for f in frames}:
            inclusive[frame] += int(count)
    skip = (
        "<module>",
        "_run_module_as_main",
        "_run_code",
        "Thread._bootstrap",
        "WorkerThread.run",
        "cmd_api",
        "asyncio_run",
        "Server.run",
        "main (",
    )
    hot = [(frame, n) for frame, n in inclusive.most_common(100) if not frame.startswith(skip)]
    lines = [f"{busy} busy samples at 200 Hz over {seconds}s (all threads)"]
    return lines + [f"{n / busy:6.1%}  {frame}" for frame, n in hot[: args.profile_top]]


def _frame_name(frame: str) -> str:
    """Returns 'function (file.py)' from py-spy's 'function (path/file.py:line)'."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1].split(':')[0]})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--targets", default=",".join(TARGETS), help="comma-separated subset of " + ",".join(TARGETS)
    )
    parser.add_argument("--tool", choices=["python", "wrk"], default="python", help="load generator")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the API under the run and metrics loads"
    )
    parser.add_argument("--profile-top", type=int, default=25)
    parser.add_argument("--smoke", action="store_true", help="a few seconds' run to check the script works")
    args = parser.parse_args(argv)
    if args.smoke:
        args.connections, args.warmup, args.duration, args.rounds = 4, 0.2, 0.5, 1
        args.targets = "ceiling,run,metrics" if args.targets == ",".join(TARGETS) else args.targets
    if args.tool == "wrk" and shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk), or use --tool python")
    targets = [t for t in args.targets.split(",") if t]
    load = load_wrk if args.tool == "wrk" else load_python
    print(header(f"api_load ({args.tool}, {args.connections} connections, {args.duration:g}s per target)"))
    with (
        tempfile.TemporaryDirectory(prefix="tuneyard-bench-") as tmp,
        fresh_database(f"tuneyard_bench_api_{os.getpid()}") as url,
    ):
        key, run_id = seed(url)
        auth = f"Bearer {key}"
        services = start_services(url, Path(tmp), {SERVICE_OF[t] for t in targets})
        try:
            urls = target_urls(services, run_id)
            check_targets({t: urls[t] for t in targets}, auth)
            results: dict[str, list[dict]] = {t: [] for t in targets}
            for _ in range(args.rounds):
                for target in targets:
                    port, path = urls[target]
                    server = psutil.Process(next(s.process.pid for s in services.values() if s.port == port))
                    cpu_before = sum(server.cpu_times()[:2])
                    # One dashboard opening a run nobody else has open: a single connection.
                    alone = argparse.Namespace(**{**vars(args), "connections": 1})
                    r = load(port, path, auth, alone if target in SINGLE_CONNECTION else args)
                    # Server CPU per request: steadier than req/s when neighbours take the cores.
                    cpu = sum(server.cpu_times()[:2]) - cpu_before
                    answered = r["req_per_s"] * (args.warmup + args.duration)
                    r["cpu_ms"] = 1000 * cpu / answered if answered else float("nan")
                    drain(port, path, auth)
                    results[target].append(r)
                    print(
                        f"  {target:<13} {r['req_per_s']:>8.0f} req/s  p50 {r['p50_ms']:>7.1f} ms  "
                        f"p99 {r['p99_ms']:>7.1f} ms  server CPU {r['cpu_ms']:>6.2f} ms/req  "
                        f"errors {r['errors']}  timeouts {r['timeouts']}"
                        + ("  <- STALLED: no response within the window" if r["req_per_s"] == 0 else ""),
                        flush=True,
                    )
            report(results)
            if any(r["req_per_s"] == 0 for rs in results.values() for r in rs):
                log_tail = (Path(tmp) / "services.log").read_text(errors="replace").splitlines()[-25:]
                print("\na target stalled; the services' log ends with:\n  " + "\n  ".join(log_tail))
            if args.profile:
                for target in ("run", "metrics"):
                    port, path = urls[target]
                    print(
                        f"\npy-spy of the API process under the {target} load (inclusive share of samples):"
                    )
                    pid = services["api"].process.pid
                    print("\n".join(profile_api(pid, port, path, auth, args, Path(tmp) / f"{target}.txt")))
        finally:
            for service in services.values():
                stop(service.process)
    print(f"finished: {header('end').splitlines()[1]}")


def report(results: dict[str, list[dict]]) -> None:
    summary = {
        t: {k: median([r[k] for r in rs]) for k in ("req_per_s", "p50_ms", "p99_ms", "cpu_ms")}
        for t, rs in results.items()
    }
    print(
        f"\n{'target':<14}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'vs ceiling':>12}{'p99 vs ceiling':>16}"
        f"{'CPU ms/req':>12}  (medians)"
    )
    ceiling = summary.get("ceiling")
    for target, s in summary.items():
        share = s["req_per_s"] / ceiling["req_per_s"] if ceiling else float("nan")
        p99 = s["p99_ms"] / ceiling["p99_ms"] if ceiling else float("nan")
        print(
            f"{target:<14}{s['req_per_s']:>9.0f}{s['p50_ms']:>9.1f}{s['p99_ms']:>9.1f}{share:>12.0%}{p99:>15.2f}x"
            f"{s['cpu_ms']:>12.2f}"
        )
    if not ceiling:
        return
    for run_target in ("run",):
        if run_target in summary:
            share = summary[run_target]["req_per_s"] / ceiling["req_per_s"]
            p99 = summary[run_target]["p99_ms"] / ceiling["p99_ms"]
            met = share >= RUN_SHARE and p99 <= RUN_P99
            print(
                f"target {run_target}: status >= {RUN_SHARE:.0%} of ceiling req/s with p99 <= {RUN_P99}x: "
                f"{'MET' if met else 'MISSED'} ({share:.0%}, {p99:.2f}x)"
            )
    for metrics_target in ("metrics",):
        if metrics_target in summary:
            share = summary[metrics_target]["req_per_s"] / ceiling["req_per_s"]
            print(
                f"target {metrics_target}: poll >= {METRICS_SHARE:.0%} of ceiling req/s: "
                f"{'MET' if share >= METRICS_SHARE else 'MISSED'} ({share:.0%})"
            )
    for chart_target in ("metrics_full", "metrics_full_uncached"):
        if chart_target in summary:
            cpu = summary[chart_target]["cpu_ms"]
            print(
                f"target {chart_target}: first chart load <= {CHART_CPU_MS:g} ms server CPU/request: "
                f"{'MET' if cpu <= CHART_CPU_MS else 'MISSED'} ({cpu:.2f} ms)"
            )


if __name__ == "__main__":
    main()
