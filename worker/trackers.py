"""Mirroring a run's metrics to experiment trackers (Weights & Biases, MLflow) from `spec.integrations`.

A tracker is a side channel: one that cannot be imported, started or written to is logged once
and switched off, and the run carries on. The database stays the record; trackers get copies.
Both work without a server: W&B in `offline` mode writes under the run's work folder
(`wandb sync` uploads it later); MLflow without a `tracking_uri` writes a local SQLite store there
(`mlflow.db`, artifacts beside it) — MLflow 3 refuses its old `./mlruns` file store by default.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from trainer_core.config import MlflowIntegration, RunSpec, WandbIntegration
from trainer_core.reporting import CheckpointInfo, Reporter

log = logging.getLogger("tuneyard.worker.trackers")

# MLflow rejects metric keys with other characters (and a rejected batch would switch it off).
_MLFLOW_UNSAFE = re.compile(r"[^\w\-. /]")


class Tracker(Protocol):
    name: str

    def log_metrics(self, stage_index: int, step: int, split: str, values: dict[str, float]) -> None: ...
    def close(self, status: str) -> None: ...


class WandbTracker:
    name = "wandb"

    def __init__(self, config: WandbIntegration, run_id: str, spec: RunSpec, folder: Path) -> None:
        import wandb

        folder.mkdir(parents=True, exist_ok=True)
        self._wandb = wandb
        # One W&B run per Tuneyard run id, resumed by later attempts.
        self._run = wandb.init(project=config.project, entity=config.entity, mode=config.mode, id=run_id,
                               name=spec.name or run_id, dir=str(folder), resume="allow",
                               config=spec.model_dump(mode="json"), reinit="create_new")
        self._stages: set[int] = set()

    def log_metrics(self, stage_index: int, step: int, split: str, values: dict[str, float]) -> None:
        prefix = f"stage{stage_index}"
        if stage_index not in self._stages:
            # Each stage counts its own steps: give its metrics their own step axis.
            self._run.define_metric(f"{prefix}/step")
            self._run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")
            self._stages.add(stage_index)
        self._run.log({f"{prefix}/step": step, **{f"{prefix}/{split}/{k}": v for k, v in values.items()}})

    def close(self, status: str) -> None:
        self._run.finish(exit_code=0 if status in ("succeeded", "cancelled") else 1)


class MlflowTracker:
    name = "mlflow"

    def __init__(self, config: MlflowIntegration, run_id: str, spec: RunSpec, folder: Path) -> None:
        from mlflow.tracking import MlflowClient

        local = config.tracking_uri is None
        if local:
            folder.mkdir(parents=True, exist_ok=True)
        uri = config.tracking_uri or f"sqlite:///{folder.resolve() / 'mlflow.db'}"
        self._client = MlflowClient(tracking_uri=uri)
        experiment = self._client.get_experiment_by_name(config.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            # A local store keeps artifacts beside it (MLflow's default is ./mlartifacts in the cwd).
            artifacts = (folder / "artifacts").resolve().as_uri() if local else None
            experiment_id = self._client.create_experiment(config.experiment, artifact_location=artifacts)
        # A later attempt of the same Tuneyard run continues the MLflow run tagged with its id.
        found = self._client.search_runs([experiment_id], filter_string=f"tags.tuneyard_run_id = '{run_id}'",
                                         max_results=1)
        if found:
            self._run_id = found[0].info.run_id
        else:
            created = self._client.create_run(experiment_id, run_name=spec.name or run_id,
                                              tags={"tuneyard_run_id": run_id})
            self._run_id = created.info.run_id
            self._client.log_dict(self._run_id, spec.model_dump(mode="json"), "run_spec.json")

    def log_metrics(self, stage_index: int, step: int, split: str, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = _millis()
        metrics = [Metric(_MLFLOW_UNSAFE.sub("_", f"stage{stage_index}/{split}/{k}"), float(v), now, step)
                   for k, v in values.items()]
        self._client.log_batch(self._run_id, metrics=metrics)

    def close(self, status: str) -> None:
        self._client.set_terminated(self._run_id, "FINISHED" if status == "succeeded" else
                                    "KILLED" if status == "cancelled" else "FAILED")


def _millis() -> int:
    import time

    return int(time.time() * 1000)


class MirroredReporter:
    """Passes every report to the database reporter and copies metrics to the trackers."""

    def __init__(self, inner: Reporter, trackers: list[Tracker]) -> None:
        self._inner = inner
        self.trackers = trackers

    def on_metrics(self, stage_index: int, step: int, split: str, values: dict[str, float]) -> None:
        self._inner.on_metrics(stage_index, step, split, values)
        for tracker in list(self.trackers):
            self._guard(tracker, tracker.log_metrics, stage_index, step, split, values)

    def on_event(self, kind: str, message: str, data: dict | None = None) -> None:
        self._inner.on_event(kind, message, data)

    def on_checkpoint(self, info: CheckpointInfo) -> None:
        self._inner.on_checkpoint(info)

    def on_checkpoint_removed(self, path: Path) -> None:
        self._inner.on_checkpoint_removed(path)

    def should_stop(self) -> bool:
        return self._inner.should_stop()

    def close(self, status: str) -> None:
        for tracker in list(self.trackers):
            self._guard(tracker, tracker.close, status)

    def _guard(self, tracker: Tracker, method: Any, *args: Any) -> None:
        try:
            method(*args)
        except Exception as exc:
            self._disable(tracker, exc)

    def _disable(self, tracker: Tracker, exc: BaseException) -> None:
        log.warning("%s tracker failed (%s: %s); metrics are no longer mirrored to it", tracker.name,
                    type(exc).__name__, exc)
        self.trackers.remove(tracker)
        self._inner.on_event("warning", f"{tracker.name} tracker failed and was switched off: "
                             f"{type(exc).__name__}: {exc}", {"tracker": tracker.name})


def _start(name: str, build: Any, reporter: Reporter) -> Tracker | None:
    try:
        return build()
    except Exception as exc:
        log.warning("%s tracker could not start (%s: %s); the run goes on without it", name,
                    type(exc).__name__, exc)
        reporter.on_event("warning", f"{name} tracker could not start: {type(exc).__name__}: {exc}",
                          {"tracker": name})
        return None


@contextmanager
def open_trackers(spec: RunSpec, run_id: str, work_dir: Path, reporter: Reporter) -> Iterator[Reporter]:
    """Yields the reporter to hand the trainer: `reporter` itself, or a mirror when trackers are asked for."""
    integrations = spec.integrations
    if integrations.wandb is None and integrations.mlflow is None:
        yield reporter
        return
    trackers: list[Tracker] = []
    if (wandb_config := integrations.wandb) is not None:
        folder = work_dir / "wandb"
        tracker = _start("wandb", lambda: WandbTracker(wandb_config, run_id, spec, folder), reporter)
        trackers += [tracker] if tracker else []
    if (mlflow_config := integrations.mlflow) is not None:
        store = work_dir / "mlflow"
        tracker = _start("mlflow", lambda: MlflowTracker(mlflow_config, run_id, spec, store), reporter)
        trackers += [tracker] if tracker else []
    mirrored = MirroredReporter(reporter, trackers)
    status = "failed"
    try:
        yield mirrored
        status = "succeeded" if not reporter.should_stop() else "cancelled"
    finally:
        mirrored.close(status)
