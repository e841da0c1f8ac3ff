"""Command line: run a spec locally, or build the tiny demo model.

    python -m trainer_core run SPEC.json --out DIR [--data ID=PATH ...] [--models-dir DIR] [--device auto]
    python -m trainer_core init-tiny DIR [--teacher-of STUDENT_DIR]

The first Ctrl-C asks the run to stop cooperatively (it saves a checkpoint); running the same
command again resumes from it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from tqdm import tqdm

from trainer_core.config import RunSpec
from trainer_core.data.records import detect_format
from trainer_core.errors import GraderFailure, TrainingDataError
from trainer_core.grader_config import RewardModelGrader
from trainer_core.reporting import CheckpointInfo


class ProgressReporter:
    """A reporter for the terminal: a tqdm bar per stage; events, checkpoints and eval metrics printed."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.stop_requested = False

    def on_metrics(self, stage_index: int, step: int, split: str, values: dict[str, float]) -> None:
        if split == "train" and self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}",
                                 tok_s=f"{values['tokens_per_second']:.0f}", refresh=False)
            self.bar.refresh()
        elif split != "train":
            tqdm.write(f"stage {stage_index} step {step} {split}: "
                       + ", ".join(f"{k}={v:.4f}" for k, v in values.items()))

    def on_event(self, kind: str, message: str, data: dict | None = None) -> None:
        if kind == "stage_started" and data is not None:
            self.bar = tqdm(total=data["total_steps"], desc=f"stage {data['stage_index']} {data['method']}")
        elif kind == "stage_finished" and self.bar is not None:
            self.bar.close()
        tqdm.write(f"[{kind}] {message}")

    def on_checkpoint(self, info: CheckpointInfo) -> None:
        tqdm.write(f"[checkpoint] {info.kind} stage {info.stage_index} step {info.step}: {info.path}")

    def on_checkpoint_removed(self, path: Path) -> None:
        tqdm.write(f"[checkpoint removed] {path}")

    def should_stop(self) -> bool:
        return self.stop_requested


def _dataset_args(values: list[str]) -> tuple[dict[str, Path], dict[str, str]]:
    """Returns (paths, formats) from ID=PATH arguments; the format is detected from the first record."""
    paths, formats = {}, {}
    for value in values:
        dataset_id, sep, path = value.partition("=")
        if not sep:
            raise SystemExit(f"--data expects ID=PATH, got {value!r}")
        with open(path) as fh:
            first = next((line for line in fh if line.strip()), "")
        fmt = detect_format(json.loads(first)) if first else None
        if fmt is None:
            raise SystemExit(f"{path}: cannot tell the dataset format from its first record")
        paths[dataset_id], formats[dataset_id] = Path(path), fmt
    return paths, formats


def _run(args: argparse.Namespace) -> int:
    from trainer_core.graders.scoring import GraderRuntime, RewardModelScorer
    from trainer_core.model_folders import ModelFolders
    from trainer_core.pipeline import run_pipeline
    from trainer_core.reward_models import load_reward_model_scorer

    spec = RunSpec.model_validate_json(Path(args.spec).read_text())
    models_dir = Path(args.models_dir) if args.models_dir else None

    def resolve_model(name: str) -> ModelFolders:
        candidate = models_dir / name if models_dir is not None else Path(name)
        if not candidate.is_dir():
            raise TrainingDataError(f"model {name!r} not found (looked for folder {candidate})")
        return ModelFolders.of(candidate)

    def reward_model(grader: RewardModelGrader) -> RewardModelScorer:
        # Locally a reward_model grader names a reward_model export folder (or one under --models-dir).
        return load_reward_model_scorer(resolve_model(grader.model).weights, grader.batch_size)

    # The judge's key: the variable api_key_env names, from this shell (the service's workers do the same).
    graders = GraderRuntime(secrets=dict(os.environ), reward_model=reward_model)
    paths, formats = _dataset_args(args.data)
    reporter = ProgressReporter()

    def request_stop(signum: int, frame: object) -> None:
        reporter.stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        tqdm.write("stopping after this step (Ctrl-C again to abort)")

    signal.signal(signal.SIGINT, request_stop)
    try:
        base = resolve_model(spec.base_model)
        result = run_pipeline(
            spec, base_model_path=base.weights, dataset_paths=paths, dataset_formats=formats,
            work_dir=Path(args.out), reporter=reporter, device=args.device, resolve_model=resolve_model,
            start_adapter=base.adapter, graders=graders,
        )
    except (TrainingDataError, GraderFailure) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"status": result.status, "exports": {k: str(v) for k, v in result.exports.items()},
                      "final_metrics": result.final_metrics}, indent=2))
    return 0 if result.status == "succeeded" else 3


def main(argv: list[str] | None = None) -> int:
    """Returns the process exit code of one CLI command."""
    parser = argparse.ArgumentParser(prog="python -m trainer_core")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train a run spec locally")
    run.add_argument("spec", help="run spec JSON file")
    run.add_argument("--out", required=True, help="work folder (checkpoints, exports); reused to resume")
    run.add_argument("--data", action="append", default=[], metavar="ID=PATH", help="dataset file per id")
    run.add_argument("--models-dir", help="folder of base models by name (default: base_model is a path)")
    run.add_argument("--device", default="auto")
    tiny = commands.add_parser("init-tiny", help="write the tiny random model used by tests and demos")
    tiny.add_argument("dir")
    tiny.add_argument("--teacher-of", metavar="STUDENT_DIR",
                      help="write a larger distillation teacher sharing this tiny model's tokenizer")
    args = parser.parse_args(argv)
    if args.command == "init-tiny":
        from trainer_core.tiny import build_tiny_model, build_tiny_teacher

        if args.teacher_of:
            print(build_tiny_teacher(Path(args.dir), tokenizer_dir=Path(args.teacher_of)))
        else:
            print(build_tiny_model(Path(args.dir)))
        return 0
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
