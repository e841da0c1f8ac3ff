"""A run on several devices: the worker launches its ranks with torchrun as child processes.

The worker process keeps everything that talks to the database (lease, heartbeat, fenced writes,
trackers); the ranks only train. Rank 0 appends its reports to a JSON-lines file that this module
replays into the worker's reporter while the gang runs, and a stop request (cancel, lost lease) is
passed down as a file rank 0 polls every step. A rank that dies (SIGKILL, OOM, NCCL error) makes
torchrun end the others and exit non-zero: the attempt ends with a system error and the run
resumes from its last checkpoint in the next attempt. The launcher dies with the worker
(PR_SET_PDEATHSIG), so no orphaned gang keeps writing checkpoints after its worker is gone.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import worker
from trainer_core.config import RunSpec
from trainer_core.errors import TrainingDataError
from trainer_core.model_folders import ModelFolders
from trainer_core.pipeline import PipelineResult
from trainer_core.reporting import Reporter, replay_reports

# A collective waiting on a rank that hangs without exiting gives up after this long (a rank that
# exits is noticed by torchrun within a second).
COLLECTIVE_TIMEOUT_SECONDS = 600
_POLL_SECONDS = 0.5
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: the launcher gets SIGTERM when the worker dies, and
    # torchrun passes it on to every rank.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _read_new(path: Path, offset: int) -> tuple[list[str], int]:
    """Returns the whole lines appended to ``path`` since ``offset``, and the new offset."""
    if not path.exists():
        return [], offset
    with open(path) as fh:
        fh.seek(offset)
        chunk = fh.read()
    complete = chunk[: chunk.rfind("\n") + 1]
    return complete.splitlines(), offset + len(complete.encode())


def launch_pipeline(
    spec: RunSpec, *, base_model_path: Path, dataset_paths: dict[str, Path], dataset_formats: dict[str, str],
    work_dir: Path, reporter: Reporter, resolve_model: Callable[[str], ModelFolders | Path] | None = None,
    start_adapter: Path | None = None, graders: Any = None, rollout_sglang_url: str | None = None,
) -> PipelineResult:
    """Returns how the run ended after training it on ``spec.resources.gpus`` torchrun ranks.

    Takes ``run_pipeline``'s arguments; ``resolve_model``, ``graders`` and ``rollout_sglang_url``
    serve SAD teachers and RL stages, which the spec keeps to one device. Raises TrainingDataError
    for the data errors a rank hit, RuntimeError for anything else that ended the gang.
    """
    gang = work_dir.parent / "gang"
    shutil.rmtree(gang, ignore_errors=True)
    gang.mkdir(parents=True)
    paths = {name: gang / name for name in ("args.json", "reports.jsonl", "stop", "result.json")}
    paths["args.json"].write_text(json.dumps({
        "spec": spec.model_dump(mode="json"), "base_model_path": str(base_model_path),
        "dataset_paths": {k: str(v) for k, v in dataset_paths.items()}, "dataset_formats": dataset_formats,
        "work_dir": str(work_dir), "start_adapter": str(start_adapter) if start_adapter else None,
        "reports": str(paths["reports.jsonl"]), "stop_file": str(paths["stop"]),
        "result_file": str(paths["result.json"]), "collective_timeout_seconds": COLLECTIVE_TIMEOUT_SECONDS,
    }))
    root = str(Path(worker.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
               "--nproc_per_node", str(spec.resources.gpus), "-m", "worker.rank_main",
               str(paths["args.json"])]
    launcher = subprocess.Popen(command, env=env, cwd=root, preexec_fn=_die_with_parent)
    offset = 0
    try:
        while True:
            exited = launcher.poll() is not None
            lines, offset = _read_new(paths["reports.jsonl"], offset)
            replay_reports(lines, reporter)
            if reporter.should_stop():
                paths["stop"].touch()
            if exited:
                break
            time.sleep(_POLL_SECONDS)
    finally:
        if launcher.poll() is None:
            launcher.terminate()
            try:
                launcher.wait(timeout=30)
            except subprocess.TimeoutExpired:
                launcher.kill()
                launcher.wait()
    return _outcome(paths["result.json"], launcher.returncode)


def _outcome(result_file: Path, returncode: int) -> PipelineResult:
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    if "status" in result and returncode == 0:
        return PipelineResult(result["status"], exports={k: Path(v) for k, v in result["exports"].items()},
                              final_metrics=result["final_metrics"])
    if result.get("error_type") == "TrainingDataError":
        raise TrainingDataError(result["message"])
    if "error_type" in result:
        raise RuntimeError(f"rank 0 failed: {result['error_type']}: {result['message']}")
    raise RuntimeError(f"a rank of the run's torchrun gang died (torchrun exit code {returncode})")
