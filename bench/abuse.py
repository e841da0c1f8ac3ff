"""Abuse bench (issue 13): the API under an idle-socket flood, pollers and uploaders, slowloris
clients, and 1,000 uploads with no worker running. Bounded (about a minute) and 127.0.0.1 only.

    .venv/bin/python bench/abuse.py [--seconds 20] [--uploads 1000]

Starts `tuneyard api` and `tuneyard reaper` (queued grace 1 s, so the reaper would have re-sent
every waiting upload many times over) on a fresh embedded data folder (SQLite, filesystem broker),
with no worker. Prints:
- errors by status during the flood (IDLE_SOCKETS idle connections held open and re-opened as the
  server cuts them, 200 pollers reading a dataset, 20 uploaders), and p50/p99 of the authenticated
  requests made during it;
- how long slow-header clients are kept before the server cuts them, and whether /healthz answered
  meanwhile;
- the `cpu` queue's depth after the uploads, next to the number of datasets waiting for
  validation: it must stay within that number plus a small constant.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from common import REPO_ROOT, free_port, header, percentile, wait_for_port

IDLE_SOCKETS = 300
POLLERS = 200
UPLOADERS = 20
SLOW_CLIENTS = 20
HEADER_TIMEOUT_S = 3
MAX_CONCURRENCY = 256
GRACE_S = 1
LINE = b'{"prompt": "2+2=", "completion": "4"}\n'


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEYARD_")}
    env.update(TUNEYARD_DATA_DIR=str(data_dir), TUNEYARD_ENV="test", PYTHONPATH=str(REPO_ROOT),
               TUNEYARD_API_HEADER_TIMEOUT_SECONDS=str(HEADER_TIMEOUT_S),
               TUNEYARD_QUEUED_GRACE_SECONDS=str(GRACE_S), TUNEYARD_REAPER_INTERVAL_SECONDS="0.5",
               # Every poller and uploader is admitted, while the idle sockets alone exceed the limit.
               TUNEYARD_API_MAX_CONCURRENCY=str(MAX_CONCURRENCY))
    return env


def _api_key(data_dir: Path) -> str:
    os.environ["TUNEYARD_DATA_DIR"] = str(data_dir)
    from app.db.migrate import migrate
    from app.db.session import make_session_factory
    from app.services.auth import create_api_key
    from app.settings import Settings

    settings = Settings(data_dir=data_dir, env="test")
    migrate(settings.database_url)
    sessions = make_session_factory(settings)
    with sessions() as session:
        _, key = create_api_key(session, "abuse")
    sessions.kw["bind"].dispose()
    return key


def _client(port: int, key: str, limits: httpx.Limits | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"},
                             timeout=30, limits=limits or httpx.Limits())


class Tally:
    def __init__(self) -> None:
        self.statuses: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.uploads = 0

    async def call(self, client: httpx.AsyncClient, method: str, url: str,
                   **kwargs: object) -> httpx.Response | None:
        started = time.perf_counter()
        try:
            response = await client.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            self.statuses[type(exc).__name__] += 1
            return None
        self.latencies.append(time.perf_counter() - started)
        self.statuses[str(response.status_code)] += 1
        return response


async def _idle_flood(port: int, stop: asyncio.Event) -> int:
    """Keeps IDLE_SOCKETS connections open that never send a byte; returns how many the server cut."""
    cut = 0

    async def one() -> None:
        nonlocal cut
        while not stop.is_set():
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                await asyncio.wait_for(reader.read(1), timeout=30)
                cut += 1
            except TimeoutError:
                pass
            finally:
                writer.close()

    tasks = [asyncio.create_task(one()) for _ in range(IDLE_SOCKETS)]
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return cut


async def _upload(client: httpx.AsyncClient, tally: Tally) -> None:
    response = await tally.call(client, "POST", "/v1/datasets", content=LINE * 4,
                                headers={"Content-Type": "application/jsonl"})
    if response is not None and response.status_code == 201:
        tally.uploads += 1


async def flood(port: int, key: str, seconds: float, dataset_id: str) -> tuple[Tally, int]:
    tally, stop = Tally(), asyncio.Event()
    limits = httpx.Limits(max_connections=POLLERS + UPLOADERS, max_keepalive_connections=POLLERS + UPLOADERS)
    async with _client(port, key, limits) as client:
        async def poller() -> None:
            while not stop.is_set():
                await tally.call(client, "GET", f"/v1/datasets/{dataset_id}")

        async def uploader() -> None:
            while not stop.is_set():
                await _upload(client, tally)

        flooder = asyncio.create_task(_idle_flood(port, stop))
        await asyncio.sleep(1.0)  # the idle sockets are in before the real traffic starts
        workers = [asyncio.create_task(poller()) for _ in range(POLLERS)]
        workers += [asyncio.create_task(uploader()) for _ in range(UPLOADERS)]
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*workers)
        return tally, await flooder


async def slow_headers(port: int) -> tuple[list[float], int]:
    """Returns how long each slow-header client was kept, and /healthz answers seen meanwhile."""
    async def slow() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        try:
            while time.monotonic() - started < 30:
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
                try:
                    if await asyncio.wait_for(reader.read(1), timeout=0.5) == b"":
                        break
                except TimeoutError:
                    continue
        except ConnectionError:
            pass
        writer.close()
        return time.monotonic() - started

    async def health() -> int:
        ok = 0
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            for _ in range(10):
                ok += (await client.get("/healthz")).status_code == 200
                await asyncio.sleep(0.2)
        return ok

    kept = asyncio.gather(*(slow() for _ in range(SLOW_CLIENTS)))
    answered = await health()
    return sorted(await kept), answered


async def uploads_without_workers(port: int, key: str, total: int, already: int) -> int:
    tally = Tally()
    async with _client(port, key) as client:
        remaining = max(0, total - already)
        for start in range(0, remaining, UPLOADERS):
            await asyncio.gather(*(_upload(client, tally) for _ in range(min(UPLOADERS, remaining - start))))
    return tally.uploads


def queue_state(data_dir: Path) -> tuple[int | None, int]:
    from sqlalchemy import func, select

    from app.broker import create_celery, queue_depth
    from app.db.models import Dataset
    from app.db.session import make_session_factory
    from app.settings import Settings

    settings = Settings(data_dir=data_dir, env="test")
    sessions = make_session_factory(settings)
    with sessions() as session:
        waiting = session.scalar(select(func.count()).select_from(Dataset)
                                 .where(Dataset.status == "validating"))
    sessions.kw["bind"].dispose()
    return queue_depth(create_celery(settings), "cpu"), int(waiting or 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20, help="length of the flood")
    parser.add_argument("--uploads", type=int, default=1000, help="uploads with no worker running")
    args = parser.parse_args()
    print(header("abuse: idle flood, pollers + uploaders, slow headers, uploads with no workers"))
    data_dir = Path(tempfile.mkdtemp(prefix="tuneyard-abuse-"))
    key = _api_key(data_dir)
    port = free_port()
    env = _env(data_dir)
    logs = data_dir / "logs"
    logs.mkdir()
    command = [sys.executable, "-m", "tuneyard_cli"]
    api = subprocess.Popen([*command, "api", "--port", str(port)], cwd=REPO_ROOT, env=env,
                           stdout=(logs / "api.log").open("w"), stderr=subprocess.STDOUT)
    reaper = subprocess.Popen([*command, "reaper"], cwd=REPO_ROOT, env=env,
                              stdout=(logs / "reaper.log").open("w"), stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
        seed = httpx.post(f"http://127.0.0.1:{port}/v1/datasets", content=LINE, timeout=30,
                          headers={"Authorization": f"Bearer {key}", "Content-Type": "application/jsonl"})
        dataset_id = seed.json()["id"]

        tally, cut = asyncio.run(flood(port, key, args.seconds, dataset_id))
        ordered = sorted(tally.latencies)
        print(f"\nflood: {IDLE_SOCKETS} idle sockets held for {args.seconds:.0f}s ({cut} cut by the header "
              f"deadline and re-opened), {POLLERS} pollers, {UPLOADERS} uploaders")
        print(f"  requests {sum(tally.statuses.values())}, by status: {dict(sorted(tally.statuses.items()))}")
        errors = {s: n for s, n in tally.statuses.items() if not s.startswith("2")}
        print(f"  errors by status: {errors or 'none'} (API admits {MAX_CONCURRENCY} requests at once; "
              "transport errors are keep-alive connections closed as a request was sent)")
        print(f"  authenticated latency p50 {percentile(ordered, 0.5) * 1000:.0f} ms, "
              f"p99 {percentile(ordered, 0.99) * 1000:.0f} ms")

        kept, answered = asyncio.run(slow_headers(port))
        print(f"\nslow headers: {SLOW_CLIENTS} clients sending a header line every 0.5 s; kept "
              f"{kept[0]:.1f}-{kept[-1]:.1f}s (header deadline {HEADER_TIMEOUT_S}s); /healthz answered "
              f"{answered}/10 meanwhile")

        before = tally.uploads + 1
        done = before + asyncio.run(uploads_without_workers(port, key, args.uploads, before))
        time.sleep(GRACE_S * 4)  # several grace periods: the old reaper re-sent every upload each time
        depth, waiting = queue_state(data_dir)
        print(f"\nno workers: {done} uploads, {waiting} datasets waiting for validation, `cpu` queue depth "
              f"{depth} after {GRACE_S * 4}s of reaper passes (grace {GRACE_S}s)")
        ok = depth is not None and depth <= waiting + 10
        print(f"  queue depth {'within' if ok else 'OVER'} waiting + 10")
        server_errors = [s for s in errors if s.isdigit() and int(s) >= 500]
        return 0 if ok and not server_errors else 1
    finally:
        for process in (api, reaper):
            process.terminate()
        for process in (api, reaper):
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    sys.exit(main())
