"""`tuneyard up`: the embedded all-in-one — migrate, the tiny model, API + worker + reaper.

The children write their logs to `<data_dir>/logs/` (the terminal keeps the few lines that
matter), and run in their own session so Ctrl-C reaches only `up`, which stops them in order.
The banner comes last, once the API answers and the worker is ready. The first API key is saved
in `<data_dir>/api-key` (mode 0600) and the address in `<data_dir>/url`: a restart reuses them, and
the client commands read them, so the printed commands work in a new shell from this folder. The
`--demo` run is submitted once (its id is kept in `<data_dir>/demo-run`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from app.settings import Settings
from tuneyard_cli.http import KEY_FILE, URL_FILE
from tuneyard_cli.server import ALL_QUEUES, TINY_MODEL, init_tiny_model

# One worker for every queue: with two pool processes, a training run in one leaves the other free
# for dataset validation and evals (each task still gets a fresh process, one prefetched message
# per process). Production workers take `train` with one process per GPU.
EMBEDDED_CONCURRENCY = 2
READY_TIMEOUT_S = 180
DEMO_FILE = "demo-run"


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")


def saved_or_new_key(settings: Settings) -> tuple[str, bool]:
    """Returns (key, is_new): the key saved by an earlier start if the database still accepts it,
    else a new key of the default team (saved for the next start)."""
    from sqlalchemy import select

    from app.db.models import ApiKey
    from app.db.session import make_session_factory
    from app.services.auth import DEFAULT_TEAM, create_api_key, hash_key

    path = settings.data_dir / KEY_FILE
    saved = path.read_text().strip() if path.is_file() else None
    sessions = make_session_factory(settings)
    try:
        with sessions() as session:
            # A saved key that was revoked, or belongs to a database since deleted, is replaced.
            if saved and session.scalar(select(ApiKey.id).where(ApiKey.key_hash == hash_key(saved),
                                                                 ApiKey.revoked_at.is_(None))):
                return saved, False
            _, key = create_api_key(session, DEFAULT_TEAM, "created by tuneyard up")
    finally:
        sessions.kw["bind"].dispose()
    _write_private(path, key)
    return key, True


def _command_prefix() -> str:
    """Returns how to call `tuneyard` from a new shell in this folder (the venv's path if not on PATH)."""
    if shutil.which("tuneyard"):
        return "tuneyard"
    script = Path(sys.executable).parent / "tuneyard"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def _start(settings: Settings, host: str, port: int) -> dict[str, subprocess.Popen]:
    logs = settings.data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, "-m", "tuneyard_cli"]
    commands = {
        "api": [*me, "api", "--host", host, "--port", str(port)],
        "worker": [*me, "worker", "--queues", ALL_QUEUES, "--concurrency", str(EMBEDDED_CONCURRENCY)],
        "reaper": [*me, "reaper"],
    }
    return {name: subprocess.Popen(argv, stdout=(logs / f"{name}.log").open("ab"), stderr=subprocess.STDOUT,
                                   start_new_session=True)
            for name, argv in commands.items()}


def _log_tail(settings: Settings, name: str, lines: int = 15) -> str:
    path = settings.data_dir / "logs" / f"{name}.log"
    text = path.read_text(errors="replace") if path.is_file() else ""
    return "\n".join(text.splitlines()[-lines:])


def _wait_ready(settings: Settings, children: dict[str, subprocess.Popen], url: str,
                stopping: list[bool]) -> str | None:
    """Returns None once the API answers and the worker is ready, else what went wrong."""
    worker_log = settings.data_dir / "logs" / "worker.log"
    start = worker_log.stat().st_size if worker_log.is_file() else 0
    deadline = time.monotonic() + READY_TIMEOUT_S
    api_up = worker_up = False
    while not (api_up and worker_up):
        if stopping[0]:
            return "interrupted"
        for name, child in children.items():
            if child.poll() is not None:
                tail = _log_tail(settings, name)
                return f"{name} exited with {child.returncode}; its last log lines:\n{tail}"
        if time.monotonic() > deadline:
            return f"not ready after {READY_TIMEOUT_S}s (logs in {settings.data_dir / 'logs'})"
        try:
            api_up = api_up or httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            pass
        if not worker_up and worker_log.is_file():
            with open(worker_log, "rb") as fh:
                fh.seek(start)
                worker_up = b" ready." in fh.read()
        time.sleep(0.3)
    return None


def _demo(settings: Settings, url: str, key: str | None) -> str | None:
    """Returns the demo run's id: submitted now on the first start, else the one submitted then."""
    marker = settings.data_dir / DEMO_FILE
    if marker.is_file():
        return marker.read_text().strip() or None
    from tuneyard_cli.demo import run_demo

    run_id = run_demo(url, key, TINY_MODEL)
    if run_id:
        marker.write_text(run_id + "\n")
    return run_id


def _banner(settings: Settings, url: str, key: str | None, new_key: bool, demo_run: str | None) -> None:
    tuneyard = _command_prefix()
    print(f"\nTuneyard is ready at {url}   dashboard: {url}/   logs: {settings.data_dir / 'logs'}")
    if key is None:
        print("authentication is OFF: no key needed (never expose this server)")
    else:
        state = "new key" if new_key else "the key from the first start"
        print(f"API key ({state}, team 'default', saved in {settings.data_dir / KEY_FILE}):\n  {key}")
    if settings.data_dir.resolve() == (Path.cwd() / ".tuneyard").resolve():
        print("\nIn any shell, from this folder (the client reads the key and address saved in .tuneyard/):")
    else:
        print(f"\nIn any shell, first: export TUNEYARD_DATA_DIR={settings.data_dir.resolve()}  "
              "(the client reads the key and address saved there)")
    if demo_run:
        print(f"  {tuneyard} runs follow {demo_run}      # the demo run")
    print(f"  {tuneyard} runs list")
    print(f"  {tuneyard} runs create examples/sft.json --data ds_sft=examples/sft.jsonl --follow")
    if key:
        print(f"Elsewhere: export TUNEYARD_URL={url} TUNEYARD_API_KEY={key}")
    print("Ctrl-C stops the API, the worker and the reaper.")


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from app.db.migrate import migrate

    host, port = args.host or settings.host, args.port or settings.port
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    stopping = [False]

    def stop(*_: object) -> None:
        stopping[0] = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"starting Tuneyard at {url} (data in {settings.data_dir}) …")
    migrate(settings.database_url)
    try:
        init_tiny_model(settings)
    except ImportError as exc:
        print(f"warning: could not build the tiny base model ({exc}); run `tuneyard models init-tiny`",
              file=sys.stderr)
    children = _start(settings, host, port)
    problem = _wait_ready(settings, children, url, stopping)
    if problem is None:
        _write_private(settings.data_dir / URL_FILE, url)
        key, new_key = saved_or_new_key(settings) if settings.auth_enabled else (None, False)
        demo_run = _demo(settings, url, key) if args.demo else None
        _banner(settings, url, key, new_key, demo_run)
        code = _supervise(children, stopping)
    else:
        if problem != "interrupted":
            print(f"tuneyard up: {problem}", file=sys.stderr)
        code = 0 if problem == "interrupted" else 1
    _stop_all(children)
    print("stopped")
    return code


def _supervise(children: dict[str, subprocess.Popen], stopping: list[bool]) -> int:
    """Returns 0 after Ctrl-C/SIGTERM, or the exit code of a child that ended on its own."""
    while not stopping[0]:
        for name, child in children.items():
            if child.poll() is not None:
                print(f"{name} exited with {child.returncode}; stopping", file=sys.stderr)
                return child.returncode or 1
        time.sleep(0.5)
    return 0


def _stop_all(children: dict[str, subprocess.Popen]) -> None:
    """Stops every child: SIGTERM, then SIGKILL after 15 s."""
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for child in children.values():
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
