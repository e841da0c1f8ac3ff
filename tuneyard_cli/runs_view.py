"""A run in the terminal: live per-stage progress (`--follow`), the human-readable `runs get`, and
what to do with a finished run (its exports and a ready-to-paste snippet)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
from tqdm import tqdm

from tuneyard_cli.http import ApiError, api_key_expression, checked, service_url

TERMINAL = {"succeeded", "failed", "cancelled"}
SHOWN_METRICS = ("loss", "eval_loss", "mean_token_accuracy", "rewards/accuracies", "rewards/margins",
                 "accuracy", "reward", "kl", "lr")
EXPORT_KINDS = ("adapter", "merged", "reward_model")
RECONNECT_TRIES = 30  # one a second: a service gone for longer ends `--follow` with one line


def _seconds(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def duration(seconds: float | None) -> str:
    """Returns 42.1s, 3m 05s or 2h 07m."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m {secs:02d}s" if minutes < 60 else f"{minutes // 60}h {minutes % 60:02d}m"


def stage_line(stage: dict[str, Any]) -> str:
    """Returns one stage's outcome with its own timing (from its start and end, not the run's)."""
    total = stage.get("total_steps")
    steps = f"{stage['step']}/{total}" if total else str(stage["step"])
    seconds = _seconds(stage.get("started_at"), stage.get("finished_at"))
    rate = f" ({seconds / stage['step']:.2f} s/step)" if seconds and stage["step"] else ""
    return (f"stage {stage['index'] + 1} {stage['method']:<4} {stage['status']:<10} {steps} steps "
            f"in {duration(seconds)}{rate}")


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


class StageBars:
    """One progress bar per stage while it runs; a finished stage is printed once with its timing.

    A bar starts when its stage is first seen running, counting from the step it was at, so its
    rate is the stage's own (not the run's, not the steps done before we attached).
    """

    def __init__(self) -> None:
        self.bars: dict[int, tqdm] = {}
        self.done: set[int] = set()
        self.latest: dict[int, dict[str, float]] = {}

    def update(self, stages: list[dict[str, Any]]) -> None:
        for stage in stages:
            index = stage["index"]
            if index in self.done:
                continue
            if stage["status"] == "running":
                bar = self.bars.get(index)
                if bar is None:
                    bar = self.bars[index] = tqdm(
                        total=stage["total_steps"], initial=stage["step"], unit="step", dynamic_ncols=True,
                        desc=f"stage {index + 1} {stage['method']}", leave=False)
                if stage["total_steps"] and bar.total != stage["total_steps"]:
                    bar.total = stage["total_steps"]
                bar.update(stage["step"] - bar.n)
            elif stage["status"] not in ("pending",):
                self.finish(stage)

    def finish(self, stage: dict[str, Any]) -> None:
        bar = self.bars.pop(stage["index"], None)
        if bar is not None:
            bar.close()
        self.done.add(stage["index"])
        metrics = self.latest.get(stage["index"], {})
        shown = "  " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()) if metrics else ""
        tqdm.write(stage_line(stage) + shown)

    def metrics(self, data: dict[str, Any]) -> None:
        values = self.latest.setdefault(data["stage_index"], {})
        values.update({k: v for k, v in data["values"].items() if k in SHOWN_METRICS and v is not None})
        if (bar := self.bars.get(data["stage_index"])) is not None:
            bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def follow_run(api: httpx.Client, run_id: str) -> str:
    """Returns the run's final status after drawing its live per-stage progress, then its summary."""
    bars = StageBars()
    last_id: str | None = None
    status = "queued"
    failures = 0
    try:
        while status not in TERMINAL:
            try:
                for event, event_id, data in _stream_messages(api, run_id, last_id):
                    failures = 0
                    last_id = event_id or last_id
                    if event == "status":
                        status = data["status"]
                        bars.update(data["stages"])
                    elif event == "metrics":
                        bars.metrics(data)
                    elif event == "event" and data["level"] in ("warning", "error"):
                        tqdm.write(f"[{data['level']}] {data['message']}")
            except httpx.TransportError as exc:
                failures += 1
                if failures > RECONNECT_TRIES:
                    raise
                tqdm.write(f"stream interrupted ({exc}); reconnecting")
                time.sleep(1)
    finally:
        bars.close()
    run = checked(api.get(f"/v1/runs/{run_id}"))
    for stage in run["stages"]:
        if stage["index"] not in bars.done and stage["status"] != "pending":
            tqdm.write(stage_line(stage))
    print(f"run {run_id}: {run['status']}" + (f" ({run['error']['message']})" if run.get("error") else ""))
    if run["status"] == "succeeded":
        print_exports(exports_of(api, run_id))
    return run["status"]


def exports_of(api: httpx.Client, run_id: str) -> list[dict[str, Any]]:
    """Returns the run's exported checkpoints (adapter, merged)."""
    page = checked(api.get(f"/v1/runs/{run_id}/checkpoints", params={"limit": 100}))
    return [c for c in page["data"] if c["kind"] in EXPORT_KINDS]


def print_exports(exports: list[dict[str, Any]]) -> None:
    """Prints the exports and how to use the first one: chat, the OpenAI SDK, download."""
    if not exports:
        return
    print("exports:")
    for c in exports:
        size = sum(f.get("size", 0) for f in c.get("files") or [])
        print(f"  {c['kind']:<8} {c['id']}  stage {c['stage_index'] + 1} step {c['step']}  "
              f"{size / 1e6:.1f} MB")
    model = exports[0]["id"]
    print(f"""
try it:
  tuneyard chat {model} "What is 2 plus 3?"
  tuneyard checkpoints download {model} ./{model}

  # Python, OpenAI SDK (pip install openai)
  import os
  from openai import OpenAI
  client = OpenAI(base_url="{service_url()}/v1", api_key={api_key_expression()})
  reply = client.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Hi"}}])
  print(reply.choices[0].message.content)""")


def _latest_metrics(api: httpx.Client, run: dict[str, Any]) -> dict[str, float]:
    if not run["stages"]:
        return {}
    last = max((s for s in run["stages"] if s["status"] != "pending"), key=lambda s: s["index"], default=None)
    if last is None:
        return {}
    body = checked(api.get(f"/v1/runs/{run['id']}/metrics", params={"stage": last["index"], "max_points": 2}))
    values = {}
    for series in body["data"]:
        if series["points"] and series["name"] in SHOWN_METRICS:
            name = series["name"] if series["split"] == "train" else f"{series['split']} {series['name']}"
            values[name] = series["points"][-1][1]
    return values


def print_run(api: httpx.Client, run: dict[str, Any]) -> None:
    """Prints a run for people: status, stages with their own timing, latest metrics, exports."""
    print(f"{run['id']}  {run['name'] or ''}  {run['status']}")
    print(f"  base model  {run['base_model']}")
    took = duration(_seconds(run["started_at"], run["finished_at"]))
    print(f"  created     {run['created_at']}   duration {took}   attempt {run['attempt']}")
    if run.get("error"):
        print(f"  error       {run['error'].get('code', '')}: {run['error'].get('message', '')}")
    print("  stages")
    for stage in run["stages"]:
        print(f"    {stage_line(stage)}")
    if metrics := _latest_metrics(api, run):
        print("  latest      " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if v is not None))
    print("  (the whole spec: tuneyard runs get ID --json)")
    if run["status"] == "succeeded":
        print_exports(exports_of(api, run["id"]))
