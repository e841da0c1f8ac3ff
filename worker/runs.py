"""A run on a worker: claim it, hold its lease, train every stage through `trainer_core`, end it.

    claimed ─ train (resumes from the last complete checkpoint in runs/<id>/work) ─┬─ succeeded
                                                       ├─ cancelled (cancel seen; checkpoint kept)
                                                       ├─ failed    (user error: bad data, out of memory)
                                                       └─ queued    (system error, attempts left) / failed

A message for a run someone else holds (Redis re-delivery, a reaper re-send) finds no claim and
returns at once. When the attempt loses its lease mid-way, its writes are refused and it returns
without touching the run.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.broker import create_celery, send_task
from app.db.models import Dataset, Run, Team
from app.db.session import make_session_factory
from app.errors import ApiError
from app.inference.resolution import find_model
from app.jobs.lease import Claim, Lease, StaleAttempt, add_event, end_attempt, requeue_attempt, take
from app.jobs.placement import claimable_here
from app.jobs.states import RUN
from app.services.datasets import check_usable
from app.services.models import reward_model_checkpoint
from app.settings import Settings, get_settings
from app.storage import LocalBlobStore, is_disk_full
from trainer_core.config import RunSpec
from trainer_core.errors import GraderFailure, TrainingDataError
from trainer_core.grader_config import RewardModelGrader
from trainer_core.graders.scoring import GraderRuntime, RewardModelScorer
from trainer_core.model_folders import ModelFolders
from worker.devices import as_worker_host, detect_devices
from worker.reporter import DbReporter
from worker.trackers import open_trackers

log = logging.getLogger("tuneyard.worker.runs")

OOM_ADVICE = ("out of memory: lower batch_size or max_seq_len (raise gradient_accumulation to keep the "
              "effective batch), or use a smaller base model")


STORAGE_FULL_ADVICE = ("the storage volume filled up while the run wrote a checkpoint; the partial folder "
                       "was removed and earlier checkpoints are kept: resume the run "
                       "(POST /v1/runs/{id}/resume) once space is freed")


@dataclass(frozen=True)
class RunInputs:
    base_model: ModelFolders  # with an adapter when the run trains an adapter checkpoint further
    dataset_paths: dict[str, Path]
    dataset_formats: dict[str, str]


@cache
def _services() -> tuple[Settings, sessionmaker[Session], LocalBlobStore, Celery]:
    settings = get_settings()
    store = LocalBlobStore(settings.storage_dir)
    return settings, make_session_factory(settings), store, create_celery(settings)


def work_dir_key(run_id: str) -> str:
    """Returns the storage key of a run's work folder (checkpoints and exports of every attempt)."""
    return f"runs/{run_id}/work"


def train_run(run_id: str) -> str:
    """Returns how this delivery of the run's message ended (the Celery task's whole body)."""
    settings, sessions, store, celery = _services()
    return execute_run(run_id, settings=settings, sessions=sessions, store=store, celery=celery)


def execute_run(run_id: str, *, settings: Settings, sessions: sessionmaker[Session], store: LocalBlobStore,
                celery: Celery, pipeline: Callable[..., Any] | None = None) -> str:
    """Returns the outcome of one attempt: succeeded|cancelled|failed|requeued|skipped|superseded."""
    with sessions() as session:
        if not claimable_here(session, run_id, as_worker_host(socket.gethostname(), detect_devices())):
            # Another worker may hold it: the reaper re-sends queued runs nobody claimed.
            return "skipped"
    taken = take(sessions, RUN, run_id, settings)
    if taken is None:
        return "skipped"
    claimed, lease = taken
    with sessions() as session:
        run = session.get(Run, run_id)
        assert run is not None
        spec_json, team_id, num_stages = run.spec, run.team_id, len(run.stages)
    reporter = DbReporter(sessions, store.root, claimed, team_id, lease, num_stages=num_stages)
    work_dir = store.path_for(work_dir_key(run_id))
    try:
        # A worker that died between writing a checkpoint and registering it left a complete folder
        # the database lacks; the trainer resumes from it, so it must be listed too.
        reporter.register_unrecorded_checkpoints(work_dir)
        spec = RunSpec.model_validate(spec_json)
        with sessions() as session:
            inputs = resolve_inputs(session, settings, store, team_id, spec)
        if pipeline is None and spec.resources.gpus > 1:
            from worker.gang import launch_pipeline as pipeline
        elif pipeline is None:
            from trainer_core.pipeline import run_pipeline as pipeline
        with open_trackers(spec, run_id, work_dir, reporter) as mirrored:
            result = pipeline(
                spec, base_model_path=inputs.base_model.weights, dataset_paths=inputs.dataset_paths,
                dataset_formats=inputs.dataset_formats, work_dir=work_dir, reporter=mirrored,
                resolve_model=lambda name: _resolve_model(sessions, settings, store, team_id, name),
                start_adapter=inputs.base_model.adapter,
                graders=grader_runtime(settings, sessions, store, team_id),
                rollout_sglang_url=settings.rollout_sglang_url,
            )
        reporter.flush()
        return _end(sessions, claimed, lease, result.status)
    except StaleAttempt:
        log.warning("run %s: attempt %d was superseded; its results are discarded", run_id, claimed.attempt)
        return "superseded"
    except TrainingDataError as exc:
        return _fail(sessions, claimed, reporter, "training_data_error", str(exc))
    except GraderFailure as exc:
        return _fail(sessions, claimed, reporter, "grader_error", str(exc))
    except Exception as exc:
        if is_out_of_memory(exc):
            return _fail(sessions, claimed, reporter, "out_of_memory", f"{OOM_ADVICE} ({exc})")
        if is_disk_full(exc):
            # Retrying would only fill the disk again: the operator has to free space first.
            log.error("run %s: storage full: %s", run_id, exc)
            return _fail(sessions, claimed, reporter, "storage_full", STORAGE_FULL_ADVICE.format(id=run_id))
        log.exception("run %s: attempt %d hit a system error", run_id, claimed.attempt)
        return _retry_or_fail(sessions, celery, claimed, reporter, exc)
    finally:
        lease.stop()


def _end(sessions: sessionmaker[Session], claim: Claim, lease: Lease, status: str) -> str:
    if status == "stopped" and lease.lost.is_set():
        raise StaleAttempt(RUN.name, claim.job_id, claim.attempt)
    if status == "stopped" and not lease.cancel_requested.is_set():
        raise RuntimeError("the trainer stopped without a cancel request")
    outcome = "succeeded" if status == "succeeded" else "cancelled"
    message = ("run succeeded" if outcome == "succeeded"
               else "run cancelled; its last checkpoint is kept (POST /v1/runs/{id}/resume continues it)")
    with sessions() as session:
        end_attempt(session, RUN, claim.job_id, claim.attempt, outcome)
        add_event(session, claim.job_id, claim.attempt, outcome, message.replace("{id}", claim.job_id))
        session.commit()
    log.info("run %s: %s", claim.job_id, outcome)
    return outcome


def _fail(sessions: sessionmaker[Session], claim: Claim, reporter: DbReporter, code: str,
          message: str) -> str:
    """Ends the run failed with no retry (the user has to change the data or the spec)."""
    _flush_quietly(reporter)
    with sessions() as session:
        end_attempt(session, RUN, claim.job_id, claim.attempt, "failed", {"code": code, "message": message})
        add_event(session, claim.job_id, claim.attempt, "error", message, {"code": code, "retry": False},
                  "error")
        session.commit()
    log.info("run %s: failed (%s): %s", claim.job_id, code, message)
    return "failed"


def _retry_or_fail(sessions: sessionmaker[Session], celery: Celery, claim: Claim, reporter: DbReporter,
                   exc: BaseException) -> str:
    _flush_quietly(reporter)
    reason = f"{type(exc).__name__}: {exc}"
    with sessions() as session:
        requeued = requeue_attempt(session, claim.job_id, claim.attempt, kind="retrying",
                                   message=f"attempt {claim.attempt} failed with a system error ({reason}); "
                                           "retrying from the last checkpoint",
                                   data={"error": reason})
        if not requeued:
            run = session.get(Run, claim.job_id)
            if run is not None and run.status in RUN.live:
                message = f"system error on the last allowed attempt ({claim.attempt}): {reason}"
                end_attempt(session, RUN, claim.job_id, claim.attempt, "failed",
                            {"code": "attempts_exhausted", "message": message})
                add_event(session, claim.job_id, claim.attempt, "error", message,
                          {"code": "attempts_exhausted", "retry": False}, "error")
        session.commit()
    if requeued:
        send_task(celery, RUN.task, [claim.job_id])
        return "requeued"
    return "failed"


def _flush_quietly(reporter: DbReporter) -> None:
    # Metrics of the steps before the error are worth keeping; a refused flush is re-raised.
    try:
        reporter.flush()
    except StaleAttempt:
        raise
    except Exception:
        log.exception("run %s: could not write the last metrics", reporter.run_id)


def is_out_of_memory(exc: BaseException) -> bool:
    """Returns whether an exception is a device or host out-of-memory error."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def resolve_inputs(session: Session, settings: Settings, store: LocalBlobStore, team_id: str,
                   spec: RunSpec) -> RunInputs:
    """Returns the files the trainer reads; raises TrainingDataError for anything gone or unusable."""
    ids = sorted(spec.dataset_ids())
    found = {d.id: d for d in session.scalars(select(Dataset).where(Dataset.team_id == team_id,
                                                                    Dataset.id.in_(ids)))}
    paths: dict[str, Path] = {}
    formats: dict[str, str] = {}
    for dataset_id in ids:
        try:
            dataset = check_usable(found.get(dataset_id), dataset_id, "dataset")
        except ApiError as exc:
            raise TrainingDataError(f"{exc.message} (then resume the run)") from None
        paths[dataset_id] = store.path_for(dataset.blob_key)
        formats[dataset_id] = dataset.format or ""
    return RunInputs(_model(session, settings, store, team_id, spec.base_model), paths, formats)


def _model(session: Session, settings: Settings, store: LocalBlobStore, team_id: str,
           name: str) -> ModelFolders:
    """Returns the folders of a model the run names (resolved at submit; gone since is a data error)."""
    team = session.get(Team, team_id)
    resolved = find_model(session, settings, store, team, name) if team is not None else None
    if resolved is None:
        raise TrainingDataError(f"model {name!r} is no longer a base model or finished checkpoint of the "
                                "team")
    return ModelFolders(resolved.weights_path, resolved.start_adapter)


def grader_runtime(settings: Settings, sessions: sessionmaker[Session], store: LocalBlobStore,
                   team_id: str) -> GraderRuntime:
    """Returns what graders need on this worker: the sandbox, the default judge, the environment and
    the team's reward models."""

    def reward_model(spec: RewardModelGrader) -> RewardModelScorer:
        from trainer_core.reward_models import load_reward_model_scorer  # torch: only when used

        with sessions() as session:
            team = session.get(Team, team_id)
            checkpoint = reward_model_checkpoint(session, team, spec.model) if team is not None else None
            if checkpoint is None:
                raise TrainingDataError(f"reward_model grader: {spec.model!r} is not a finished reward_model "
                                        "checkpoint of the team")
            folder = store.path_for(checkpoint.blob_prefix)
        return load_reward_model_scorer(folder, spec.batch_size)

    return GraderRuntime(
        secrets=dict(os.environ), judge_base_url=settings.default_judge_url,
        judge_api_key=settings.judge_api_key, reward_model=reward_model,
    )


def _resolve_model(sessions: sessionmaker[Session], settings: Settings, store: LocalBlobStore, team_id: str,
                   name: str) -> ModelFolders:
    with sessions() as session:
        return _model(session, settings, store, team_id, name)
