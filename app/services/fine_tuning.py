"""OpenAI's fine-tuning jobs as a face on runs: a job is a one-stage run, its files are datasets.

    validating_files ─ files ready ─► the run is created; from then on the job's status is the run's
            │                         (queued, running, succeeded, failed, cancelled; paused while a
            │                         pause stopped the run and no resume or cancel came yet)
            ├─ a file invalid ─► failed (invalid_training_file / invalid_validation_file, line numbers)
            └─ cancel ─► cancelled

A job waits in `validating_files` while a file is still validating; the validation task, and the
reaper as a fallback, call `start_waiting_jobs` when a file's result is in. Pause is a cancel the
job remembers (`paused`): the run stops at a checkpoint and resume continues it from there.

"auto" hyperparameters, resolved from the training file's record count n once it is validated:
- n_epochs: 3, raised to ceil(100 / n) (at most 25) for files under 34 records and lowered to
  max(1, 25000 // n) for files over 8333 records (OpenAI's published rule of thumb);
- batch_size: the power of two nearest n / 64, between 1 and 32, and never above n;
- learning_rate_multiplier: 1.0, times the stage method's default rate (SFT 2e-4, DPO 5e-6,
  GRPO 5e-6 for LoRA);
- beta (dpo): 0.1.
A supervised job trains without packing, so batch_size counts examples as OpenAI's does; a
reinforcement job's batch_size counts prompts, each sampled `RL_GENERATIONS` times. A checkpoint
is written about once per epoch (every ceil(n / batch_size) steps) and the last three are kept.
"""

from __future__ import annotations

import math
import random
from typing import Any

from celery import Celery
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db.models import Dataset, FineTuningJob, Run, Team, utcnow
from app.errors import ApiError, Conflict, NotFound, Unprocessable
from app.ids import new_id
from app.jobs.lease import add_event
from app.schemas.fine_tuning import JobCreate
from app.services import outbox, runs
from app.services.files import error_lines
from app.services.models import base_model_dir
from app.services.owned import get_owned
from app.services.snapshots import SnapshotCache
from app.settings import Settings
from trainer_core.config import DPOStage, GRPOStage, RunSpec, SFTStage
from trainer_core.grader_config import Grader

STAGE_METHOD = {"supervised": "sft", "dpo": "dpo", "reinforcement": "grpo"}
FILE_FORMAT = {"supervised": "sft", "dpo": "preference", "reinforcement": "prompts"}
FORMAT_HINT = {
    "sft": "chat records (`messages` ending with an assistant turn)",
    "preference": "preference records (`input`, `preferred_output`, `non_preferred_output`)",
    "prompts": "prompt records (`messages` without the final assistant turn, plus the fields your grader "
               "reads)",
}
IGNORED_RL_HYPERPARAMETERS = ("compute_multiplier", "eval_interval", "eval_samples", "reasoning_effort")
RL_GENERATIONS = 4
KEEP_CHECKPOINTS = 3
GRADER: TypeAdapter[Any] = TypeAdapter(Grader)
STAGE_MODELS = {"sft": SFTStage, "dpo": DPOStage, "grpo": GRPOStage}


def model_name(base: str, team: Team, suffix: str | None, job_id: str) -> str:
    """Returns `ft:{base}:{team}:{suffix}:{job id}` (without a suffix its slot stays empty, as OpenAI's)."""
    team_slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in team.name.lower()) or team.id
    return f"ft:{base}:{team_slug}:{suffix or ''}:{job_id}"


def _method_of(body: JobCreate) -> dict[str, Any]:
    """Returns the request's method as a dict, the deprecated top-level hyperparameters read as supervised."""
    if body.method is not None:
        return body.method.model_dump(mode="json", exclude_none=True)
    hyper = body.hyperparameters.model_dump(mode="json", exclude_none=True) if body.hyperparameters else {}
    return {"type": "supervised", "supervised": {"hyperparameters": hyper}}


def hyperparameters_of(method: dict[str, Any]) -> dict[str, Any]:
    return dict(method.get(method["type"], {}).get("hyperparameters") or {})


def _usable_file(session: Session, team: Team, file_id: str, param: str) -> Dataset:
    try:
        return get_owned(session, Dataset, team, file_id)
    except NotFound:
        raise ApiError(f"{param}: no file {file_id!r}; upload it with POST /v1/files first",
                       code="file_not_found", param=param) from None


def create_job(session: Session, settings: Settings, celery: Celery, team: Team,
               body: JobCreate) -> FineTuningJob:
    """Returns the new job: `validating_files`, or already backed by a queued run when its files are ready."""
    method = _method_of(body)
    _usable_file(session, team, body.training_file, "training_file")
    if body.validation_file is not None:
        _usable_file(session, team, body.validation_file, "validation_file")
    if base_model_dir(settings, body.model) is None:
        raise ApiError(f"model {body.model!r} is not a base model of this server (GET /v1/models lists them)",
                       code="model_not_found", param="model")
    if method["type"] == "reinforcement":
        _check_grader(method["reinforcement"]["grader"])
    job_id = new_id("ftjob")
    job = FineTuningJob(
        id=job_id, team_id=team.id, status="validating_files", model=body.model,
        training_file=body.training_file, validation_file=body.validation_file, suffix=body.suffix,
        seed=body.seed if body.seed is not None else random.SystemRandom().randrange(2**31),
        method=method, job_metadata=body.metadata,
        integrations=[i.model_dump(mode="json", exclude_none=True) for i in body.integrations or []] or None,
        fine_tuned_model=model_name(body.model, team, body.suffix, job_id), paused=False)
    session.add(job)
    # Committed before the files are looked at: a validation that ends after our look finds the
    # job waiting and starts it; one that ended before it is seen here. No job waits unnoticed.
    session.commit()
    run = _start_if_ready(session, settings, team, job)
    session.commit()
    if run is not None:
        runs.announce_run(celery, run.id)
    return job


def start_waiting_jobs(session: Session, settings: Settings, celery: Celery,
                       file_id: str | None = None) -> list[str]:
    """Returns the ids of runs created for jobs whose files finished validating (all files, or `file_id`'s).

    Safe to call from several processes at once: a job is started by one guarded UPDATE.
    """
    stmt = select(FineTuningJob).where(FineTuningJob.status == "validating_files")
    if file_id is not None:
        stmt = stmt.where((FineTuningJob.training_file == file_id)
                          | (FineTuningJob.validation_file == file_id))
    started = []
    for job in session.scalars(stmt).all():
        team = session.get(Team, job.team_id)
        assert team is not None
        run = _start_if_ready(session, settings, team, job)
        session.commit()
        if run is not None:
            runs.announce_run(celery, run.id)
            started.append(run.id)
    return started


def _files(session: Session, job: FineTuningJob) -> list[tuple[str, Dataset | None]]:
    files = [("training_file", session.get(Dataset, job.training_file))]
    if job.validation_file is not None:
        files.append(("validation_file", session.get(Dataset, job.validation_file)))
    return files


def _start_if_ready(session: Session, settings: Settings, team: Team, job: FineTuningJob) -> Run | None:
    """Returns the run created for the job, or None while a file validates or when the job failed."""
    files = _files(session, job)
    if any(d is not None and d.status == "validating" for _, d in files):
        return None
    if not _take(session, job, "started"):
        return None
    for param, dataset in files:
        problem = _file_problem(dataset, param, job)
        if problem is not None:
            _fail_before_run(session, job, f"invalid_{param}", problem, param)
            return None
    training = files[0][1]
    assert training is not None and training.num_records is not None
    method, spec_or_error = _resolve(job, training.num_records)
    if isinstance(spec_or_error, str):
        _fail_before_run(session, job, "invalid_hyperparameters", spec_or_error, "method")
        return None
    try:
        run = runs.add_run(session, settings, team, spec_or_error, name=job.id)
    except ApiError as exc:
        _fail_before_run(session, job, exc.code, exc.message, exc.param)
        return None
    job.run_id, job.method = run.id, method
    ignored = [k for k in IGNORED_RL_HYPERPARAMETERS if k in hyperparameters_of(method)]
    if ignored:
        add_event(session, run.id, 0, "ignored_hyperparameters",
                  f"accepted and ignored: {', '.join(ignored)} (no equivalent in Tuneyard's GRPO stage)",
                  {"ignored": ignored}, "warning")
    return run


def _take(session: Session, job: FineTuningJob, status: str) -> bool:
    """Returns True if this process moved the job out of `validating_files` (one guarded UPDATE)."""
    moved = session.execute(update(FineTuningJob).where(FineTuningJob.id == job.id,
                                                        FineTuningJob.status == "validating_files")
                            .values(status=status).execution_options(synchronize_session=False)).rowcount
    if moved != 1:
        session.rollback()
        return False
    job.status = status
    return True


def _file_problem(dataset: Dataset | None, param: str, job: FineTuningJob) -> str | None:
    file_id = job.training_file if param == "training_file" else job.validation_file
    if dataset is None:
        return f"{param} {file_id} was deleted before the job started; upload it again"
    if dataset.status == "invalid":
        total = (dataset.stats or {}).get("num_errors", len(dataset.errors))
        return f"{param} {file_id} has {total} invalid record(s): {error_lines(dataset.errors)}"
    wanted = FILE_FORMAT[job.method["type"]]
    if dataset.format != wanted:
        return (f"{param} {file_id} holds {FORMAT_HINT.get(dataset.format or '', dataset.format)}; method "
                f"{job.method['type']!r} trains on {FORMAT_HINT[wanted]}")
    return None


def _fail_before_run(session: Session, job: FineTuningJob, code: str, message: str,
                     param: str | None) -> None:
    job.status, job.finished_at = "failed", utcnow()
    job.error = {"code": code, "message": message, "param": param}
    outbox.job_ended(session, job, "failed")


def _check_grader(grader: dict[str, Any]) -> None:
    """Returns when the grader is one the GRPO stage can score with; 422 naming the field otherwise."""
    try:
        GRADER.validate_python(grader)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first["loc"]]
        if loc and loc[0] == grader.get("type"):
            loc = loc[1:]  # pydantic names the union member first
        param = ".".join(["method.reinforcement.grader", *loc])
        raise Unprocessable(f"{param}: {first['msg']}", code="invalid_grader", param=param) from None


def _auto_epochs(n: int) -> int:
    if n * 3 < 100:
        return min(25, math.ceil(100 / n))
    if n * 3 > 25000:
        return max(1, 25000 // n)
    return 3


def _auto_batch(n: int) -> int:
    target = max(1.0, n / 64)
    return max(1, min(32, n, 2 ** round(math.log2(target))))


def _resolve(job: FineTuningJob, n: int) -> tuple[dict[str, Any], RunSpec | str]:
    """Returns (the method with "auto" resolved, the run spec) — or an error message instead of the spec."""
    method = dict(job.method)
    kind = method["type"]
    hyper = hyperparameters_of(method)
    resolved = {
        "n_epochs": _auto_epochs(n) if hyper.get("n_epochs", "auto") == "auto" else hyper["n_epochs"],
        "batch_size": _auto_batch(n) if hyper.get("batch_size", "auto") == "auto" else hyper["batch_size"],
        "learning_rate_multiplier": 1.0 if hyper.get("learning_rate_multiplier", "auto") == "auto"
        else hyper["learning_rate_multiplier"],
    }
    if kind == "dpo":
        resolved["beta"] = 0.1 if hyper.get("beta", "auto") == "auto" else hyper["beta"]
    method[kind] = {**method.get(kind, {}), "hyperparameters": {**hyper, **resolved}}
    stage = _stage(job, kind, resolved, n)
    try:
        spec = RunSpec.model_validate({
            "name": job.id, "base_model": job.model, "seed": job.seed, "stages": [stage],
            "checkpoint_every_steps": stage.pop("checkpoint_every"), "keep_checkpoints": KEEP_CHECKPOINTS,
            "export": ["adapter"], "integrations": _integrations(job),
        })
    except ValidationError as exc:
        first = exc.errors()[0]
        return method, f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    return method, spec


def _stage(job: FineTuningJob, kind: str, hyper: dict[str, Any], n: int) -> dict[str, Any]:
    method = STAGE_METHOD[kind]
    base_rate = STAGE_MODELS[method].model_fields["learning_rate"].default
    batch = hyper["batch_size"]
    stage: dict[str, Any] = {
        "method": method, "datasets": [{"id": job.training_file}], "epochs": float(hyper["n_epochs"]),
        "learning_rate": base_rate * hyper["learning_rate_multiplier"],
        # About one checkpoint per epoch (the final step always has one).
        "checkpoint_every": max(1, math.ceil(n / batch)),
    }
    if job.validation_file is not None:
        stage["eval_dataset"] = job.validation_file
        stage["eval_every_steps"] = stage["checkpoint_every"]
    if method == "grpo":
        # The grader is the stage's reward as it is: the GRPO stage takes OpenAI's grader shapes.
        stage.update(batch_size=batch * RL_GENERATIONS, num_generations=RL_GENERATIONS,
                     reward=job.method["reinforcement"]["grader"])
    else:
        stage["batch_size"] = batch
    if method == "sft":
        stage["packing"] = False  # OpenAI's batch_size counts examples, not packed sequences
    if method == "dpo":
        stage["beta"] = hyper["beta"]
    return stage


def _integrations(job: FineTuningJob) -> dict[str, Any]:
    for integration in job.integrations or []:
        if integration.get("type") == "wandb":
            wandb = integration["wandb"]
            return {"wandb": {"project": wandb["project"], "entity": wandb.get("entity")}}
    return {}


# ---------------------------------------------------------------- reads and lifecycle


def get_job(session: Session, team: Team, job_id: str) -> FineTuningJob:
    """Returns the team's job; 404 for a missing one or another team's."""
    return get_owned(session, FineTuningJob, team, job_id)


def job_run(session: Session, job: FineTuningJob) -> Run | None:
    return session.get(Run, job.run_id) if job.run_id else None


RUN_TO_JOB = {"queued": "queued", "running": "running", "succeeded": "succeeded", "failed": "failed",
              "cancelled": "cancelled", "cancelling": "cancelled"}


def job_status(job: FineTuningJob, run: Run | None) -> str:
    """Returns the job's OpenAI status: its own before a run exists, else the run's (paused when paused)."""
    if run is None:
        return job.status if job.status != "started" else "failed"
    if job.paused and run.status in ("cancelling", "cancelled"):
        return "paused"
    return RUN_TO_JOB[run.status]


def cancel_job(session: Session, snapshots: SnapshotCache, team: Team, job_id: str) -> FineTuningJob:
    """Returns the job after a cancel: cancelled at once before its run or while paused, else as its run."""
    job = get_job(session, team, job_id)
    run = job_run(session, job)
    if run is None:
        if not _take(session, job, "cancelled"):
            session.refresh(job)
            if job.run_id is None:
                raise Conflict(f"fine-tuning job {job.id} is {job.status}; it cannot be cancelled",
                               code="job_not_cancellable")
            return cancel_job(session, snapshots, team, job_id)
        job.finished_at = utcnow()
        outbox.job_ended(session, job, "cancelled")
        session.commit()
        return job
    if job.paused:
        job.paused = False
        if run.status == "cancelled":
            outbox.job_ended(session, job, "cancelled")
        session.commit()
        return job
    try:
        runs.cancel_run(session, snapshots, team, run.id)
    except Conflict as exc:
        raise Conflict(f"fine-tuning job {job.id} is {job_status(job, run)}; only queued or running jobs can "
                       "be cancelled", code="job_not_cancellable") from exc
    return job


def pause_job(session: Session, snapshots: SnapshotCache, team: Team, job_id: str) -> FineTuningJob:
    """Returns the job after a pause: its run stops at a checkpoint and the job reads `paused`."""
    job = get_job(session, team, job_id)
    run = job_run(session, job)
    if run is None or run.status not in ("queued", "running") or job.paused:
        raise Conflict(f"fine-tuning job {job.id} is {job_status(job, run)}; only a queued or running job "
                       "can be paused", code="job_not_pausable")
    job.paused = True
    session.commit()  # before the run stops: its end must read the job as paused
    try:
        runs.cancel_run(session, snapshots, team, run.id)
    except Conflict:
        job.paused = False
        session.commit()
        raise
    return job


def resume_job(session: Session, snapshots: SnapshotCache, settings: Settings, celery: Celery, team: Team,
               job_id: str) -> FineTuningJob:
    """Returns the paused job queued again; its run continues from its last checkpoint."""
    job = get_job(session, team, job_id)
    run = job_run(session, job)
    if run is None or not job.paused:
        raise Conflict(f"fine-tuning job {job.id} is {job_status(job, run)}; only a paused job can be "
                       "resumed", code="job_not_resumable")
    if run.status == "cancelling":
        raise Conflict(f"fine-tuning job {job.id} is still pausing (its run {run.id} is stopping at a "
                       "checkpoint); retry in a few seconds", code="job_pausing")
    job.paused = False
    session.flush()
    runs.resume_run(session, snapshots, settings, celery, team, run.id)
    return job
