"""The `tuneyard` command: migrate, api, worker, reaper, keys, models (init-tiny, add, list) and up
(tuneyard_cli.up); the HTTP client commands come from tuneyard_cli.client."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from datetime import datetime
from pathlib import Path

import httpx
from pydantic import ValidationError

from app.settings import Settings, get_settings
from tuneyard_cli import serving
from tuneyard_cli.client import add_commands
from tuneyard_cli.http import unreachable

TINY_MODEL = "tiny-llama"
ALL_QUEUES = "train,cpu,eval"


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
    from app.server import serve

    serve(settings, args.host or settings.host, args.port or settings.port)
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


def require_database(settings: Settings) -> None:
    """Returns when the settings' database exists; exits with one line (and creates nothing) otherwise."""
    from sqlalchemy.engine import make_url

    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").is_file():
        raise SystemExit(f"tuneyard: no Tuneyard database at {url.database} — run this in the folder where "
                         "`tuneyard up` runs (it keeps .tuneyard/ there), set TUNEYARD_DATA_DIR, or create "
                         "one with `tuneyard migrate`")


def cmd_keys_create(settings: Settings, args: argparse.Namespace) -> int:
    from app.db.session import make_session_factory
    from app.services.auth import create_api_key

    require_database(settings)
    with make_session_factory(settings)() as session:
        team, key = create_api_key(session, args.team, args.name or "")
    print(f"team {team.name} ({team.id}); API key (shown once, store it now):\n{key}")
    return 0


def cmd_keys_list(settings: Settings, args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from app.db.models import Team
    from app.db.session import make_session_factory
    from app.services.auth import list_keys

    require_database(settings)
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

    require_database(settings)
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


def cmd_models_add(settings: Settings, args: argparse.Namespace) -> int:
    from app.services.models import check_model_folder, folder_facts, register_model

    folder = Path(args.path)
    name = args.name or folder.resolve().name
    check = check_model_folder(folder)
    for warning in check.warnings:
        print(f"warning: {warning}")
    try:
        target = register_model(settings, folder, name, copy=args.copy)
    except ValueError as exc:
        raise SystemExit(f"tuneyard: {exc}") from None
    facts = folder_facts(target)
    size = f"{facts.parameters / 1e6:.1f}M parameters" if facts.parameters else f"{facts.size_bytes} bytes"
    print(f"base model {name!r} ({facts.architecture}, {size}) at {target}"
          f"{'' if args.copy else f' -> {folder.resolve()}'}; use it as \"base_model\": \"{name}\"")
    return 0


def cmd_reaper(settings: Settings, args: argparse.Namespace) -> int:
    from app.jobs.reaper import run_reaper_forever
    from worker.webhooks import start_deliverer

    start_deliverer(settings)  # the webhook outbox is sent from the reaper's process, on its own thread
    run_reaper_forever(settings)
    return 0


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from tuneyard_cli.up import cmd_up as up

    return up(settings, args)


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
    add = models.add_parser("add", help="check a Hugging Face model folder and make it a base model")
    add.add_argument("path", help="the folder (config.json, weights, tokenizer)")
    add.add_argument("--name", help="base_model name, e.g. Qwen/Qwen2.5-0.5B-Instruct (default: folder name)")
    add.add_argument("--copy", action="store_true", help="copy the folder instead of linking to it")
    add.set_defaults(run=cmd_models_add)
    models.add_parser("list", help="list base models (with architecture and size) and your checkpoints") \
        .set_defaults(run=lambda _settings, args: serving.cmd_models_list(args))
    sub.add_parser("reaper", help="re-queue stale and unclaimed runs, forever").set_defaults(run=cmd_reaper)
    up = sub.add_parser("up", help="embedded all-in-one: migrate, tiny model, API + worker + reaper")
    up.add_argument("--host", help="API bind address (default TUNEYARD_HOST or 127.0.0.1)")
    up.add_argument("--port", type=int, help="API port (default TUNEYARD_PORT or 8000)")
    up.add_argument("--demo", action="store_true",
                    help="on the first start, upload a small dataset and submit a short SFT run")
    up.set_defaults(run=cmd_up)
    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one command; the usual mistakes end in one line on stderr, never a traceback."""
    args = build_parser().parse_args(argv)
    settings = load_settings()
    if args.command in ("api", "worker", "reaper"):
        from app.observability import configure_logging

        configure_logging(settings.log_json)
    try:
        return args.run(settings, args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except httpx.TransportError as exc:
        print(unreachable(exc), file=sys.stderr)
        return 1

