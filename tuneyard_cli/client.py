"""The terminal client: `tuneyard datasets|runs|checkpoints …` against the HTTP API.

The server is `TUNEYARD_URL` (default http://127.0.0.1:8000) and the key `TUNEYARD_API_KEY`.
`runs create SPEC.json --follow` and `runs follow ID` draw one progress bar per stage from the
run's event stream (reconnecting with Last-Event-ID); `checkpoints download` resumes partial
files with HTTP Range and checks every file's sha256.
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

TERMINAL = {"succeeded", "failed", "cancelled"}
SHOWN_METRICS = ("loss", "eval_loss", "mean_token_accuracy", "rewards/accuracies", "reward", "kl", "lr")
CHUNK = 1 << 20


class ApiError(SystemExit):
    def __init__(self, response: httpx.Response) -> None:
        try:
            error = response.json()["error"]
            text = f"{error['code']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            text = response.text[:500]
        super().__init__(f"tuneyard: HTTP {response.status_code} {text}")


def client(url: str | None = None, key: str | None = None) -> httpx.Client:
    """Returns an HTTP client for the server and key of the environment (or the arguments)."""
    url = url or os.environ.get("TUNEYARD_URL", "http://127.0.0.1:8000")
    key = key or os.environ.get("TUNEYARD_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=httpx.Timeout(30, read=300))


def checked(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        raise ApiError(response)
    return response.json()


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


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


def cmd_datasets_upload(args: argparse.Namespace) -> int:
    dataset = upload_dataset(client(), Path(args.file), args.format, args.name)
    print(f"{dataset['id']}  {dataset['status']}  format={dataset['format']}  "
          f"records={dataset['num_records']}")
    for error in dataset.get("errors") or []:
        print(f"  line {error.get('line')}: {error.get('field') or ''} {error.get('message')}")
    return 0 if dataset["status"] == "ready" else 1


# ---------------------------------------------------------------- runs


def _stream_messages(api: httpx.Client, run_id: str, last_id: str | None) -> Iterator[tuple[str, str, Any]]:
    headers = {"Last-Event-ID": last_id} if last_id else {}
    event, event_id, data = "", "", None
    with api.stream("GET", f"/v1/runs/{run_id}/stream", headers=headers,
                    timeout=httpx.Timeout(30, read=None)) as response:
        if response.status_code >= 400:
            response.read()
            raise ApiError(response)
        for line in response.iter_lines():
            if not line:
                if event:
                    yield event, event_id, data
                event, data = "", None
            elif line.startswith("event: "):
                event = line[7:]
            elif line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])


def follow_run(api: httpx.Client, run_id: str) -> str:
    """Returns the run's final status after drawing its live per-stage progress and latest metrics."""
    bars: dict[int, tqdm] = {}
    latest: dict[int, dict[str, float]] = {}
    last_id: str | None = None
    status = "queued"

    def bar(index: int, total: int | None, method: str) -> tqdm:
        if index not in bars:
            bars[index] = tqdm(total=total, desc=f"stage {index + 1} {method}", position=index, unit="step",
                               dynamic_ncols=True, leave=True)
        elif total and bars[index].total != total:
            bars[index].total = total
            bars[index].refresh()
        return bars[index]

    try:
        while status not in TERMINAL:
            try:
                for event, event_id, data in _stream_messages(api, run_id, last_id):
                    last_id = event_id or last_id
                    if event == "status":
                        status = data["status"]
                        for stage in data["stages"]:
                            b = bar(stage["index"], stage["total_steps"], stage["method"])
                            b.n = stage["step"]
                            b.refresh()
                    elif event == "metrics":
                        values = latest.setdefault(data["stage_index"], {})
                        values.update({k: v for k, v in data["values"].items()
                                       if k in SHOWN_METRICS and v is not None})
                        if data["stage_index"] in bars:
                            bars[data["stage_index"]].set_postfix({k: f"{v:.4g}" for k, v in values.items()})
                    elif event == "event" and data["level"] in ("warning", "error"):
                        tqdm.write(f"[{data['level']}] {data['message']}")
            except (httpx.TransportError, httpx.HTTPStatusError) as exc:
                tqdm.write(f"stream interrupted ({exc}); reconnecting")
                time.sleep(1)
    finally:
        for b in bars.values():
            b.close()
    run = checked(api.get(f"/v1/runs/{run_id}"))
    print(f"run {run_id}: {run['status']}" + (f" ({run['error']['message']})" if run.get("error") else ""))
    return run["status"]


def cmd_runs_create(args: argparse.Namespace) -> int:
    api = client()
    run = checked(api.post("/v1/runs", json=json.loads(Path(args.spec).read_text())))
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
    _print(checked(client().get(f"/v1/runs/{args.run_id}")))
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


def cmd_checkpoints_download(args: argparse.Namespace) -> int:
    paths = download_checkpoint(client(), args.checkpoint_id, Path(args.dir))
    print(f"{len(paths)} files in {args.dir}, sha256 verified")
    return 0


# ---------------------------------------------------------------- wiring


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Adds `datasets`, `runs` and `checkpoints` to the `tuneyard` command."""

    def command(group: argparse._SubParsersAction, name: str, handler: Any, help_text: str,
                *arguments: tuple[tuple[str, ...], dict[str, Any]]) -> None:
        parser = group.add_parser(name, help=help_text)
        for flags, options in arguments:
            parser.add_argument(*flags, **options)
        parser.set_defaults(run=lambda _settings, args: handler(args))

    datasets = sub.add_parser("datasets", help="datasets (HTTP client)").add_subparsers(
        dest="datasets_command", required=True)
    command(datasets, "upload", cmd_datasets_upload, "upload a JSONL file and wait for validation",
            (("file",), {}), (("--format",), {}), (("--name",), {}))
    runs = sub.add_parser("runs", help="training runs (HTTP client)").add_subparsers(
        dest="runs_command", required=True)
    command(runs, "create", cmd_runs_create, "submit a run spec (JSON file)", (("spec",), {}),
            (("--follow",), {"action": "store_true", "help": "show live progress until the run ends"}))
    command(runs, "follow", cmd_runs_follow, "show a run's live progress until it ends", (("run_id",), {}))
    command(runs, "list", cmd_runs_list, "list runs", (("--status",), {}),
            (("--limit",), {"type": int, "default": 20}))
    command(runs, "get", cmd_runs_get, "print a run", (("run_id",), {}))
    command(runs, "cancel", cmd_runs_cancel, "cancel a run", (("run_id",), {}))
    command(runs, "resume", cmd_runs_resume, "resume a failed or cancelled run from its last checkpoint",
            (("run_id",), {}))
    checkpoints = sub.add_parser("checkpoints", help="checkpoints (HTTP client)").add_subparsers(
        dest="checkpoints_command", required=True)
    command(checkpoints, "download", cmd_checkpoints_download,
            "download a checkpoint (resumable, sha256-checked)",
            (("checkpoint_id",), {}), (("dir",), {}))
