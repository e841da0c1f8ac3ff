"""The terminal client: `tuneyard datasets|runs|checkpoints …` against the HTTP API.

Where the service is and which key to use: tuneyard_cli.http. `runs create SPEC --data NAME=FILE`
uploads the files a spec names and fills in their ids; `--follow` and `runs follow` draw one
progress bar per stage (tuneyard_cli.runs_view); `checkpoints download` resumes partial files with
HTTP Range and checks every file's sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from trainer_core.config import METHOD_FORMATS
from tuneyard_cli.http import ApiError, checked, client
from tuneyard_cli.runs_view import SHOWN_METRICS, follow_run, print_run

CHUNK = 1 << 20


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def read_json(path: Path) -> Any:
    """Returns a JSON file's content; exits with one line (file, line, column) if it is not JSON."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"tuneyard: no such file: {path}") from None
    except json.JSONDecodeError as exc:
        raise SystemExit(f"tuneyard: {path} is not valid JSON: {exc.msg} at line {exc.lineno} column "
                         f"{exc.colno}") from None


# ---------------------------------------------------------------- datasets


def upload_dataset(api: httpx.Client, path: Path, fmt: str | None = None, name: str | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Returns the dataset after streaming the file up (progress bar) and waiting for validation."""
    size = path.stat().st_size
    bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"upload {path.name}", disable=not progress)

    def chunks() -> Iterator[bytes]:
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                bar.update(len(chunk))
                yield chunk

    params = {k: v for k, v in {"format": fmt, "name": name or path.name}.items() if v}
    with bar:
        dataset = checked(api.post("/v1/datasets", content=chunks(), params=params,
                               headers={"Content-Type": "application/jsonl", "Content-Length": str(size)}))
    while dataset["status"] == "validating":
        time.sleep(0.5)
        dataset = checked(api.get(f"/v1/datasets/{dataset['id']}"))
    return dataset


def _dataset_errors(dataset: dict[str, Any]) -> None:
    for error in dataset.get("errors") or []:
        print(f"  line {error.get('line')}: {error.get('field') or ''} {error.get('message')}")


def cmd_datasets_upload(args: argparse.Namespace) -> int:
    dataset = upload_dataset(client(), _existing(Path(args.file)), args.format, args.name)
    print(f"{dataset['id']}  {dataset['status']}  format={dataset['format']}  "
          f"records={dataset['num_records']}")
    _dataset_errors(dataset)
    return 0 if dataset["status"] == "ready" else 1


def cmd_datasets_list(args: argparse.Namespace) -> int:
    page = checked(client().get("/v1/datasets", params={"limit": args.limit}))
    for ds in page["data"]:
        print(f"{ds['id']}  {ds['status']:<10} {ds['format'] or '-':<12} "
              f"{ds['num_records'] or 0:>7} records  {ds['name'] or ''}")
    if not page["data"]:
        print("no datasets yet: tuneyard datasets upload FILE")
    return 0


def _stat(value: Any) -> str:
    if isinstance(value, dict):
        return "  ".join(f"{k} {_stat(v)}" for k, v in value.items())
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def cmd_datasets_get(args: argparse.Namespace) -> int:
    ds = checked(client().get(f"/v1/datasets/{args.dataset_id}"))
    if args.json:
        _print(ds)
        return 0
    print(f"{ds['id']}  {ds['name'] or ''}  {ds['status']}")
    print(f"  format {ds['format'] or '-'}   records {ds['num_records']}   {ds['size_bytes']} bytes   "
          f"created {ds['created_at']}")
    for name, value in (ds.get("stats") or {}).items():
        print(f"  {name.replace('_', ' '):<20} {_stat(value)}")
    _dataset_errors(ds)
    return 0


def cmd_datasets_preview(args: argparse.Namespace) -> int:
    page = checked(client().get(f"/v1/datasets/{args.dataset_id}/preview", params={"limit": args.limit}))
    for record in page["data"]:
        print(json.dumps(record, ensure_ascii=False))
    return 0


# ---------------------------------------------------------------- runs


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise SystemExit(f"tuneyard: no such file: {path}")
    return path


def _data_args(pairs: list[str]) -> dict[str, Path]:
    """Returns {NAME: FILE} from `--data NAME=FILE` arguments, every file checked to exist."""
    mapping: dict[str, Path] = {}
    for pair in pairs:
        name, sep, file = pair.partition("=")
        if not sep or not name or not file:
            raise SystemExit(f"tuneyard: --data takes NAME=FILE (the id the spec uses, then the file), "
                             f"got {pair!r}")
        mapping[name] = _existing(Path(file))
    return mapping


def _dataset_refs(spec: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str, str]]:
    """Yields (holder, key, method) for every dataset reference of a spec: stage datasets and eval sets."""
    for stage in spec.get("stages") or []:
        method = stage.get("method", "")
        for ref in stage.get("datasets") or []:
            yield ref, "id", method
        if stage.get("eval_dataset"):
            yield stage, "eval_dataset", method


def upload_spec_data(api: httpx.Client, spec: dict[str, Any], files: dict[str, Path]) -> dict[str, Any]:
    """Returns the spec with each NAME of `files` replaced by the id of that file, uploaded and validated.

    The format comes from the methods that train on it when they take a single one (dpo: preference,
    ppo/grpo: prompts, sad: trajectories); otherwise the service detects it.
    """
    refs = list(_dataset_refs(spec))
    named = {holder[key] for holder, key, _ in refs}
    for name in files:
        if name not in named:
            raise SystemExit(f"tuneyard: --data {name}=…: the spec names no dataset {name!r} "
                             f"(it names {', '.join(sorted(named)) or 'none'})")
    ids: dict[str, str] = {}
    for name, path in files.items():
        formats = {METHOD_FORMATS.get(method, ("",))[0] for holder, key, method in refs
                   if holder[key] == name and len(METHOD_FORMATS.get(method, ())) == 1}
        dataset = upload_dataset(api, path, formats.pop() if len(formats) == 1 else None, path.name)
        if dataset["status"] != "ready":
            print(f"{path}: {dataset['status']}")
            _dataset_errors(dataset)
            raise SystemExit(f"tuneyard: {path} did not validate; fix the lines above and run again")
        print(f"{name} = {dataset['id']}  ({path}, {dataset['format']}, {dataset['num_records']} records)")
        ids[name] = dataset["id"]
    for holder, key, _ in refs:
        holder[key] = ids.get(holder[key], holder[key])
    return spec


def cmd_runs_create(args: argparse.Namespace) -> int:
    spec = read_json(Path(args.spec))
    files = _data_args(args.data or [])
    api = client()
    if files:
        spec = upload_spec_data(api, spec, files)
    run = checked(api.post("/v1/runs", json=spec))
    print(f"{run['id']}  {run['status']}")
    if not args.follow:
        return 0
    return 0 if follow_run(api, run["id"]) == "succeeded" else 1


def cmd_runs_follow(args: argparse.Namespace) -> int:
    return 0 if follow_run(client(), args.run_id) == "succeeded" else 1


def _stage_number(index: int | None) -> str:
    """Returns the stage as people count it (from 1; the API's index is 0-based)."""
    return "-" if index is None else str(index + 1)


def cmd_runs_list(args: argparse.Namespace) -> int:
    params = {"limit": args.limit, **({"status": args.status} if args.status else {})}
    for run in checked(client().get("/v1/runs", params=params))["data"]:
        progress = run["progress"]
        print(f"{run['id']}  {run['status']:<10} {progress['fraction'] * 100:5.1f}%  "
              f"stage {_stage_number(progress['stage'])} "
              f"step {progress['step']}/{progress['total_steps'] or '?'}  "
              f"{run['name'] or ''}")
    return 0


def cmd_runs_get(args: argparse.Namespace) -> int:
    api = client()
    run = checked(api.get(f"/v1/runs/{args.run_id}"))
    if args.json:
        _print(run)
    else:
        print_run(api, run)
    return 0


def cmd_runs_cancel(args: argparse.Namespace) -> int:
    run = checked(client().post(f"/v1/runs/{args.run_id}/cancel"))
    print(f"{run['id']}  {run['status']}")
    return 0


def cmd_runs_resume(args: argparse.Namespace) -> int:
    run = checked(client().post(f"/v1/runs/{args.run_id}/resume"))
    print(f"{run['id']}  {run['status']}")
    return 0


# ---------------------------------------------------------------- checkpoints


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_checkpoint(api: httpx.Client, checkpoint_id: str, folder: Path,
                        progress: bool = True) -> list[Path]:
    """Returns the files of a checkpoint downloaded into `folder`, resuming partial ones, sha256-checked."""
    checkpoint = checked(api.get(f"/v1/checkpoints/{checkpoint_id}"))
    total = sum(f["size"] for f in checkpoint["files"])
    paths: list[Path] = []
    with tqdm(total=total, unit="B", unit_scale=True, desc=checkpoint_id, disable=not progress) as bar:
        for file in checkpoint["files"]:
            target = folder / file["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_name(target.name + ".part")
            done = target.is_file() and target.stat().st_size == file["size"]
            if done and _sha256(target) == file["sha256"]:
                bar.update(file["size"])
                paths.append(target)
                continue
            for _ in range(2):  # a corrupt partial file is downloaded again once from zero
                have = part.stat().st_size if part.is_file() else 0
                bar.update(have)
                if have < file["size"]:
                    _fetch(api, f"/v1/checkpoints/{checkpoint_id}/files/{file['path']}", part, have, bar)
                if _sha256(part) == file["sha256"]:
                    break
                bar.update(-part.stat().st_size)
                part.unlink()
            else:
                raise SystemExit(f"tuneyard: {file['path']} does not match its sha256 after two downloads")
            os.replace(part, target)
            paths.append(target)
    return paths


def _fetch(api: httpx.Client, url: str, part: Path, offset: int, bar: tqdm) -> None:
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with api.stream("GET", url, headers=headers) as response:
        if response.status_code not in (200, 206):
            response.read()
            raise ApiError(response)
        mode = "ab" if response.status_code == 206 else "wb"
        if mode == "wb" and offset:
            bar.update(-offset)
        with open(part, mode) as out:
            for chunk in response.iter_bytes(CHUNK):
                out.write(chunk)
                bar.update(len(chunk))


def cmd_checkpoints_list(args: argparse.Namespace) -> int:
    page = checked(client().get(f"/v1/runs/{args.run_id}/checkpoints", params={"limit": 100}))
    for c in page["data"]:
        size = sum(f.get("size", 0) for f in c.get("files") or [])
        metrics = "  ".join(f"{k} {v:.4g}" for k, v in (c.get("metrics") or {}).items()
                            if k in SHOWN_METRICS and isinstance(v, (int, float)))
        print(f"{c['id']}  {c['kind']:<7} stage {c['stage_index'] + 1} step {c['step']:<6} "
              f"{size / 1e6:8.1f} MB  {metrics}")
    if not page["data"]:
        print(f"run {args.run_id} has no checkpoints yet")
    return 0


def cmd_checkpoints_download(args: argparse.Namespace) -> int:
    paths = download_checkpoint(client(), args.checkpoint_id, Path(args.dir))
    print(f"{len(paths)} files in {args.dir}, sha256 verified")
    return 0


# ---------------------------------------------------------------- wiring


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Adds the HTTP client's commands (datasets, runs, checkpoints, evals, chat) to `tuneyard`."""
    from tuneyard_cli import serving

    def command(group: argparse._SubParsersAction, name: str, handler: Any, help_text: str,
                *arguments: tuple[tuple[str, ...], dict[str, Any]]) -> None:
        parser = group.add_parser(name, help=help_text)
        for flags, options in arguments:
            parser.add_argument(*flags, **options)
        parser.set_defaults(run=lambda _settings, args: handler(args))

    as_json = (("--json",), {"action": "store_true", "help": "print the API object as JSON"})
    limit = (("--limit",), {"type": int, "default": 20})
    datasets = sub.add_parser("datasets", help="datasets (HTTP client)").add_subparsers(
        dest="datasets_command", required=True)
    command(datasets, "upload", cmd_datasets_upload, "upload a JSONL file and wait for validation",
            (("file",), {}), (("--format",), {}), (("--name",), {}))
    command(datasets, "list", cmd_datasets_list, "list datasets, newest first", limit)
    command(datasets, "get", cmd_datasets_get, "show a dataset: status, stats, validation errors",
            (("dataset_id",), {}), as_json)
    command(datasets, "preview", cmd_datasets_preview, "print a dataset's first records (JSONL)",
            (("dataset_id",), {}), (("--limit",), {"type": int, "default": 5}))
    runs = sub.add_parser("runs", help="training runs (HTTP client)").add_subparsers(
        dest="runs_command", required=True)
    command(runs, "create", cmd_runs_create, "submit a run spec (JSON file)", (("spec",), {}),
            (("--data",), {"action": "append", "metavar": "NAME=FILE",
                           "help": "upload FILE and use its id wherever the spec names dataset NAME"}),
            (("--follow",), {"action": "store_true", "help": "show live progress until the run ends"}))
    command(runs, "follow", cmd_runs_follow, "show a run's live progress until it ends", (("run_id",), {}))
    command(runs, "list", cmd_runs_list, "list runs", (("--status",), {}), limit)
    command(runs, "get", cmd_runs_get, "show a run: stages with their timing, latest metrics, exports",
            (("run_id",), {}), as_json)
    command(runs, "cancel", cmd_runs_cancel, "cancel a run", (("run_id",), {}))
    command(runs, "resume", cmd_runs_resume, "resume a failed or cancelled run from its last checkpoint",
            (("run_id",), {}))
    checkpoints = sub.add_parser("checkpoints", help="checkpoints (HTTP client)").add_subparsers(
        dest="checkpoints_command", required=True)
    command(checkpoints, "list", cmd_checkpoints_list, "list a run's checkpoints and exports",
            (("run_id",), {}))
    command(checkpoints, "download", cmd_checkpoints_download,
            "download a checkpoint (resumable, sha256-checked)",
            (("checkpoint_id",), {}), (("dir",), {}))
    evals = sub.add_parser("evals", help="evals (HTTP client)").add_subparsers(
        dest="evals_command", required=True)
    command(evals, "create", serving.cmd_evals_create, "evaluate models on a dataset, wait for the results",
            (("--model",), {"action": "append", "required": True,
                            "help": "a base model or checkpoint (repeat)"}),
            (("--dataset",), {"required": True, "help": "dataset id"}),
            (("--metric",), {"action": "append", "help": "metric (repeat; default loss)"}),
            (("--max-examples",), {"type": int}),
            (("--no-wait",), {"action": "store_true", "help": "print the eval id and return"}))
    command(evals, "get", serving.cmd_evals_get, "show an eval's results side by side", (("eval_id",), {}),
            as_json)
    command(sub, "chat", serving.cmd_chat, "ask a model (base or checkpoint) one question",
            (("model",), {}), (("prompt",), {}), (("--max-tokens",), {"type": int, "default": 64}),
            (("--temperature",), {"type": float, "default": 0.0}))
