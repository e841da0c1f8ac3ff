"""Using models from the terminal: `models list`, `evals create|get` and `chat MODEL "prompt"`."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from tuneyard_cli.http import checked, client

EVAL_DONE = {"succeeded", "failed"}


def _size(model: dict[str, Any]) -> str:
    parameters = model.get("parameters")
    if parameters:
        return f"{parameters / 1e9:.2f}B params" if parameters >= 1e8 else f"{parameters / 1e6:.1f}M params"
    return ""


def cmd_models_list(args: argparse.Namespace) -> int:
    for model in checked(client().get("/v1/models"))["data"]:
        if model["kind"] == "base":
            detail = f"{model.get('architecture') or '-':<24} {_size(model)}"
        else:
            detail = f"from run {model.get('run_id') or '-'}"
        print(f"{model['id']:<40} {model['kind']:<7} {detail}")
    return 0


def print_eval(ev: dict[str, Any]) -> None:
    """Prints an eval's metrics as rows and its models as columns."""
    print(f"{ev['id']}  {ev.get('name') or ''}  {ev['status']}  dataset {ev['dataset_id']}")
    if ev.get("error"):
        print(f"  error: {ev['error'].get('message')}")
    rows = {row["model"]: row for row in (ev.get("results") or {}).get("table", [])}
    models = [m for m in ev["models"] if m in rows]
    if not models:
        return
    width = max(12, *(len(m) for m in models))
    print(f"  {'metric':<20}" + "".join(f"{m:>{width + 2}}" for m in models))
    for metric in ev["metrics"]:
        cells = "".join(f"{_cell(rows[m].get(metric)):>{width + 2}}" for m in models)
        print(f"  {metric:<20}{cells}")


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-" if value is None else str(value)


def cmd_evals_create(args: argparse.Namespace) -> int:
    api = client()
    body = {"models": args.model, "dataset_id": args.dataset, "metrics": args.metric or ["loss"]}
    if args.max_examples:
        body["max_examples"] = args.max_examples
    ev = checked(api.post("/v1/evals", json=body))
    print(f"{ev['id']}  {ev['status']}")
    if args.no_wait:
        return 0
    while ev["status"] not in EVAL_DONE:
        time.sleep(1)
        ev = checked(api.get(f"/v1/evals/{ev['id']}"))
    print_eval(ev)
    return 0 if ev["status"] == "succeeded" else 1


def cmd_evals_get(args: argparse.Namespace) -> int:
    ev = checked(client().get(f"/v1/evals/{args.eval_id}"))
    if args.json:
        print(json.dumps(ev, indent=2))
    else:
        print_eval(ev)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    body = {"model": args.model, "messages": [{"role": "user", "content": args.prompt}],
            "max_tokens": args.max_tokens, "temperature": args.temperature}
    # The first request to a model loads it into the service: give it time.
    reply = checked(client().post("/v1/chat/completions", json=body, timeout=300))
    print(reply["choices"][0]["message"]["content"])
    return 0
