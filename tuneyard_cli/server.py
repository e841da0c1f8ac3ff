"""The `tuneyard` command: migrate, api, worker, keys, models, up (the embedded all-in-one)."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from pydantic import ValidationError

from app.settings import Settings, get_settings

TINY_MODEL = "tiny-llama"
ALL_QUEUES = "train,cpu,eval"
# `up` runs one worker for every queue: with two pool processes, a training run in one leaves the
# other free for dataset validation and evals (each task still gets a fresh process, one
# prefetched message per process). Two runs submitted together may then train side by side;
# production workers take `train` with one process per GPU.
EMBEDDED_CONCURRENCY = 2


def load_settings() -> Settings:
    """Returns the validated settings, or exits with one line per invalid TUNEYARD_* variable."""
    try:
        return get_settings()
    except ValidationError as exc:
        print("tuneyard: invalid settings, refusing to start:", file=sys.stderr)
        for error in exc.errors():
            field = ".".join(str(p) for p in error.get("loc", ())) or "settings"
            name = f"TUNEYARD_{field.upper()}" if field != "settings" else "settings"
            print(f"  {name}: {error.get('msg')} (got {error.get('input')!r})", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from app.db.migrate import migrate

    migrate(settings.database_url)
    print(f"database at {_redact(settings.database_url)} is up to date")
    return 0


def cmd_api(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run("app.main:build_app", factory=True, host=args.host or settings.host,
                port=args.port or settings.port, log_config=None, access_log=False,
                limit_concurrency=settings.api_max_concurrency)
    return 0


def worker_argv(settings: Settings, queues: str, concurrency: int) -> list[str]:
    """Returns the celery worker arguments for the settings (filesystem broker: no broadcast features)."""
    argv = ["worker", "-Q", queues, "-c", str(concurrency), "--loglevel", "INFO",
            "-n", f"tuneyard-{os.getpid()}@%h"]
    if settings.broker_url.startswith("filesystem"):
        argv += ["--without-mingle", "--without-gossip", "--without-heartbeat"]
    return argv


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from worker.celery_app import app

    app.worker_main(worker_argv(settings, args.queues, args.concurrency))
    return 0


def cmd_keys_create(settings: Settings, args: argparse.Namespace) -> int:
    from app.db.session import make_session_factory
    from app.services.auth import create_api_key

    with make_session_factory(settings)() as session:
        team, key = create_api_key(session, args.team, args.name or "")
    print(f"team {team.name} ({team.id}); API key (shown once, store it now):\n{key}")
    return 0


def cmd_keys_list(settings: Settings, args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from app.db.models import Team
    from app.db.session import make_session_factory
    from app.services.auth import list_keys

    with make_session_factory(settings)() as session:
        team_id = session.scalar(select(Team.id).where(Team.name == args.team)) if args.team else None
        if args.team and team_id is None:
            print(f"tuneyard: no team {args.team!r}", file=sys.stderr)
            return 1
        rows = list_keys(session, team_id)
    print(f"{'id':<32} {'team':<20} {'prefix':<12} {'created':<20} {'last used':<20} {'revoked':<20} name")
    for key, team in rows:
        print(f"{key.id:<32} {team:<20} {key.prefix:<12} {_when(key.created_at):<20} "
              f"{_when(key.last_used_at):<20} {_when(key.revoked_at):<20} {key.name}")
    return 0


def cmd_keys_revoke(settings: Settings, args: argparse.Namespace) -> int:
    from app.db.session import make_session_factory
    from app.errors import NotFound
    from app.services.auth import revoke_key

    with make_session_factory(settings)() as session:
        try:
            key = revoke_key(session, args.key_id)
        except NotFound as exc:
            print(f"tuneyard: {exc.message}", file=sys.stderr)
            return 1
    print(f"key {key.id} ({key.prefix}…) revoked at {_when(key.revoked_at)}; API processes refuse it within "
          f"{settings.auth_cache_seconds:g}s")
    return 0


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def init_tiny_model(settings: Settings, name: str = TINY_MODEL) -> Path:
    """Returns the folder of the tiny base model, building it (atomically) if it is missing."""
    target = settings.base_models_dir / name
    if (target / "config.json").is_file():
        return target
    from trainer_core.tiny import build_tiny_model

    staging = settings.base_models_dir / f".{name}.building-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    build_tiny_model(staging)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


def cmd_models_init_tiny(settings: Settings, args: argparse.Namespace) -> int:
    print(f"base model {args.name} at {init_tiny_model(settings, args.name)}")
    return 0


def cmd_reaper(settings: Settings, args: argparse.Namespace) -> int:
    from app.jobs.reaper import run_reaper_forever
    from worker.webhooks import start_deliverer

    start_deliverer(settings)  # the webhook outbox is sent from the reaper's process, on its own thread
    run_reaper_forever(settings)
    return 0


def _first_start_key(settings: Settings) -> str | None:
    from app.db.session import make_session_factory
    from app.services.auth import DEFAULT_TEAM, create_api_key, team_count

    with make_session_factory(settings)() as session:
        if team_count(session):
            return None
        _, key = create_api_key(session, DEFAULT_TEAM, "created by tuneyard up")
        return key


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from app.db.migrate import migrate

    migrate(settings.database_url)
    try:
        init_tiny_model(settings)
    except ImportError as exc:
        print(f"warning: could not build the tiny base model ({exc}); run `tuneyard models init-tiny`",
              file=sys.stderr)
    me = [sys.executable, "-m", "tuneyard_cli"]
    children = {
        "api": subprocess.Popen([*me, "api"]),
        "worker": subprocess.Popen([*me, "worker", "--queues", ALL_QUEUES,
                                    "--concurrency", str(EMBEDDED_CONCURRENCY)]),
        "reaper": subprocess.Popen([*me, "reaper"]),
    }
    url = f"http://{settings.host}:{settings.port}"
    print(f"\nTuneyard is starting at {url}  (data in {settings.data_dir})")
    key: str | None = None
    if not settings.auth_enabled:
        print("authentication is OFF: no key needed (never expose this server)")
    elif key := _first_start_key(settings):
        print(f"API key for team 'default' (key shown once, store it now):\n  {key}")
        print(f"  curl -H 'Authorization: Bearer {key}' {url}/v1/datasets")
    else:
        print("use the key printed at first start, or create one: tuneyard keys create --team NAME")
    if getattr(args, "demo", False):
        from tuneyard_cli.demo import run_demo

        run_demo(url, key or _demo_key(settings), TINY_MODEL)
    return _supervise(children)


def _demo_key(settings: Settings) -> str | None:
    """Returns a fresh key of the default team for the demo (None when authentication is off)."""
    if not settings.auth_enabled:
        return None
    from app.db.session import make_session_factory
    from app.services.auth import DEFAULT_TEAM, create_api_key

    with make_session_factory(settings)() as session:
        return create_api_key(session, DEFAULT_TEAM, "tuneyard up --demo")[1]


def _supervise(children: dict[str, subprocess.Popen]) -> int:
    """Waits until Ctrl-C/SIGTERM or a child exits, then stops every child (SIGTERM, then SIGKILL)."""
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    while not stopping:
        for name, child in children.items():
            if child.poll() is not None:
                print(f"{name} exited with {child.returncode}; stopping", file=sys.stderr)
                code, stopping = child.returncode or 1, True
        time.sleep(0.5)
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
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneyard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="upgrade the database schema (locked against concurrent runs)") \
        .set_defaults(run=cmd_migrate)
    api = sub.add_parser("api", help="serve the HTTP API (uvicorn)")
    api.add_argument("--host")
    api.add_argument("--port", type=int)
    api.set_defaults(run=cmd_api)
    worker = sub.add_parser("worker", help="run a Celery worker")
    worker.add_argument("--queues", default=ALL_QUEUES, help=f"comma-separated (default {ALL_QUEUES})")
    worker.add_argument("--concurrency", type=int, default=1)
    worker.set_defaults(run=cmd_worker)
    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="create a key for a team (team created if needed)")
    create.add_argument("--team", required=True)
    create.add_argument("--name", help="a label for the key")
    create.set_defaults(run=cmd_keys_create)
    listing = keys.add_parser("list", help="list the keys (prefix, created, last used, revoked)")
    listing.add_argument("--team", help="only this team's keys")
    listing.set_defaults(run=cmd_keys_list)
    revoke = keys.add_parser("revoke", help="revoke a key by its id (key_…): it answers 401 from then on")
    revoke.add_argument("key_id")
    revoke.set_defaults(run=cmd_keys_revoke)
    models = sub.add_parser("models", help="base models").add_subparsers(dest="models_command", required=True)
    tiny = models.add_parser("init-tiny", help="build the tiny local base model into the base-models dir")
    tiny.add_argument("--name", default=TINY_MODEL)
    tiny.set_defaults(run=cmd_models_init_tiny)
    sub.add_parser("reaper", help="re-queue stale and unclaimed runs, forever").set_defaults(run=cmd_reaper)
    up = sub.add_parser("up", help="embedded all-in-one: migrate, tiny model, API + worker + reaper")
    up.add_argument("--demo", action="store_true",
                    help="then upload a small dataset and submit a short SFT run")
    up.set_defaults(run=cmd_up)
    from tuneyard_cli.client import add_commands

    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = load_settings()
    if args.command in ("api", "worker", "up", "reaper"):
        from app.observability import configure_logging

        configure_logging(settings.log_json)
    return args.run(settings, args)

