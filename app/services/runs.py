"""Runs: create (validated against the team's datasets and models), list, get, cancel, events.

A new run is committed first and only then announced with one `tuneyard.train_run` message on
the `train` queue; if the broker is down the run stays `queued` and the reaper re-sends it.

Dataset checks on create: an unknown dataset answers 422 (the request names something that does
not exist; param `stages[i].datasets[j].id`), a dataset still `validating` answers 409 (retry once
validation finished), an `invalid` dataset or one whose format the stage method cannot train on
answers 422.
"""

from __future__ import annotations

import hashlib
import json
import logging

from celery import Celery
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload, object_session, sessionmaker

from app.broker import send_task
from app.db.models import Dataset, Event, Run, RunStage, Team
from app.errors import Conflict
from app.ids import is_id, new_id
from app.jobs.lease import add_event
from app.jobs.placement import check_fit, waiting_reason
from app.jobs.states import RUN, IllegalTransition, transition_atomically
from app.schemas.common import ListPage
from app.schemas.runs import EventOut, RunOut, StageOut
from app.services.datasets import check_usable
from app.services.deployment import check_deployment_runs
from app.services.metrics import run_progress
from app.services.model_refs import resolve_spec_models
from app.services.owned import get_owned
from app.services.pagination import paginate
from app.services.snapshots import SnapshotCache
from app.settings import Settings
from trainer_core.config import RunSpec

log = logging.getLogger("tuneyard.runs")


def request_hash(spec: RunSpec) -> str:
    """Returns a stable hash of the submitted spec (to tell a retry from a different request)."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_run_inputs(session: Session, settings: Settings, team: Team, spec: RunSpec) -> RunSpec:
    """Returns the spec with its models pinned to ids, once every dataset and model is usable by the team."""
    ids = {i for i in spec.dataset_ids() if is_id(i, "ds")}
    found = {d.id: d for d in session.scalars(
        select(Dataset).where(Dataset.team_id == team.id, Dataset.id.in_(ids)))}
    for i, stage in enumerate(spec.stages):
        for j, ref in enumerate(stage.datasets):
            check_usable(found.get(ref.id), ref.id, f"stages[{i}].datasets[{j}].id", method=stage.method)
        if stage.eval_dataset:
            check_usable(found.get(stage.eval_dataset), stage.eval_dataset, f"stages[{i}].eval_dataset",
                         method=stage.method)
    check_deployment_runs(settings, spec)
    return resolve_spec_models(session, settings, team, spec)


def _by_idempotency_key(session: Session, team: Team, key: str, digest: str) -> Run | None:
    run = session.scalar(select(Run).where(Run.team_id == team.id, Run.idempotency_key == key))
    if run is not None and run.request_hash != digest:
        raise Conflict("Idempotency-Key was already used with a different request body; use a new key",
                       code="idempotency_key_reused", param="Idempotency-Key")
    return run


def add_run(session: Session, settings: Settings, team: Team, spec: RunSpec, *, name: str | None = None,
            idempotency_key: str | None = None, digest: str | None = None) -> Run:
    """Returns a new `queued` run added to the session and flushed (not committed, no message sent).

    Raises the API errors of `check_run_inputs` for datasets or a base model it cannot use, and
    422 `does_not_fit` when no registered worker could hold the run (`app.jobs.placement`).
    """
    spec = check_run_inputs(session, settings, team, spec)
    estimate, fit_warning = check_fit(session, settings, team, spec)
    run = Run(id=new_id("run"), team_id=team.id, name=name or spec.name, status="queued",
              base_model=spec.base_model, spec=spec.model_dump(mode="json"), idempotency_key=idempotency_key,
              request_hash=digest or request_hash(spec), attempt=0, max_attempts=settings.max_attempts,
              estimate=estimate)
    run.stages = [RunStage(index=i, method=stage.method, status="pending", step=0)
                  for i, stage in enumerate(spec.stages)]
    session.add(run)
    session.flush()  # the run row first: events reference it without an ORM relationship
    session.add(Event(run_id=run.id, attempt=0, kind="queued", message="run created and queued"))
    if fit_warning is not None:
        session.add(Event(run_id=run.id, attempt=0, kind="fit_unchecked", message=fit_warning,
                          level="warning"))
    return run


def announce_run(celery: Celery, run_id: str) -> None:
    """Sends the run's first message (call after the commit); a lost one is re-sent by the reaper."""
    if not send_task(celery, "tuneyard.train_run", [run_id]):
        log.warning("run %s stays queued until the broker is back (the reaper re-sends it)", run_id)


def create_run(session: Session, settings: Settings, celery: Celery, team: Team, spec: RunSpec,
               idempotency_key: str | None = None) -> tuple[Run, bool]:
    """Returns (run, created); a retried request with the same Idempotency-Key returns the first run."""
    digest = request_hash(spec)
    if idempotency_key and (existing := _by_idempotency_key(session, team, idempotency_key, digest)):
        return existing, False
    try:
        run = add_run(session, settings, team, spec, idempotency_key=idempotency_key, digest=digest)
    except IntegrityError:  # the same Idempotency-Key committed concurrently
        session.rollback()
        existing = _by_idempotency_key(session, team, idempotency_key, digest) if idempotency_key else None
        if existing is None:
            raise
        return existing, False
    session.commit()
    announce_run(celery, run.id)
    return run, True


def _waiting_reason(run: Run) -> str | None:
    # Only a queued run can be waiting; the look at the workers needs the session the run came from.
    session = object_session(run) if run.status == "queued" else None
    return waiting_reason(session, run) if session is not None else None


def run_out(run: Run) -> RunOut:
    """Returns the API object of a run with its stages loaded (progress and ETA read the stage rows)."""
    return RunOut(
        id=run.id, name=run.name, status=run.status, base_model=run.base_model, spec=run.spec,
        stages=[StageOut.model_validate(s) for s in run.stages], progress=run_progress(run),
        attempt=run.attempt, error=run.error, estimate=run.estimate,
        waiting_reason=_waiting_reason(run), created_at=run.created_at, started_at=run.started_at,
        finished_at=run.finished_at,
    )


async def run_json(sessions: sessionmaker[Session], cache: SnapshotCache, team: Team, run_id: str) -> bytes:
    """Returns the JSON of the team's run: from the snapshot cache (no thread hop, no query) or from
    one SELECT of the run with its stages."""
    return await cache.answer(run_id, "run", team.id, lambda: _load_run_json(sessions, cache, team, run_id))


def _load_run_json(sessions: sessionmaker[Session], cache: SnapshotCache, team: Team, run_id: str) -> bytes:
    with sessions() as session:
        run = get_owned(session, Run, team, run_id, options=[joinedload(Run.stages)])
        cache.remember_owner(run.id, run.team_id)
        body = run_out(run).model_dump_json().encode()
    cache.put(run.id, "run", body, None)
    return body


def list_runs(session: Session, team: Team, *, status: str | None, limit: int,
              after: str | None) -> ListPage[RunOut]:
    stmt = select(Run).where(Run.team_id == team.id).options(joinedload(Run.stages))
    if status:
        stmt = stmt.where(Run.status == status)
    rows, has_more, cursor = paginate(session, stmt, Run.id, limit=limit, after=after)
    return ListPage[RunOut](data=[run_out(r) for r in rows], has_more=has_more, next_cursor=cursor)


def cancel_run(session: Session, snapshots: SnapshotCache, team: Team, run_id: str) -> Run:
    """Returns the run after a cancel request: queued → cancelled now, running → cancelling.

    Cancelling an already `cancelling` run is a no-op; a finished run answers 409.
    """
    run = get_owned(session, Run, team, run_id)
    for _ in range(3):  # a worker may claim or finish the run between our read and our update
        if run.status == "cancelling":
            return run
        target = "cancelled" if run.status == "queued" else "cancelling"
        try:
            moved = transition_atomically(session, RUN, run, target)
        except IllegalTransition as exc:
            raise Conflict(f"run {run.id} is {run.status}; only queued or running runs can be cancelled",
                           code="run_not_cancellable") from exc
        if moved:
            break
    else:
        raise Conflict(f"run {run.id} changed state while cancelling; retry", code="run_state_changed")
    add_event(session, run.id, run.attempt, "cancel_requested" if target == "cancelling" else "cancelled",
              f"cancel requested; run is {target}")
    session.commit()
    snapshots.drop(run.id)
    return run


def resume_run(session: Session, snapshots: SnapshotCache, settings: Settings, celery: Celery, team: Team,
               run_id: str) -> Run:
    """Returns a failed or cancelled run moved back to `queued` (it continues from its last checkpoint).

    The attempt cap restarts: the run may use `settings.max_attempts` more attempts from here.
    """
    run = get_owned(session, Run, team, run_id)
    try:
        moved = transition_atomically(session, RUN, run, "queued", error=None,
                                      max_attempts=run.attempt + settings.max_attempts)
    except IllegalTransition as exc:
        raise Conflict(f"run {run.id} is {run.status}; only failed or cancelled runs can be resumed",
                       code="run_not_resumable") from exc
    if not moved:
        raise Conflict(f"run {run.id} changed state while resuming; retry", code="run_state_changed")
    add_event(session, run.id, run.attempt, "resume_requested",
              "resume requested; the run continues from its last complete checkpoint")
    session.commit()
    snapshots.drop(run.id)
    send_task(celery, "tuneyard.train_run", [run.id])
    return run


def list_events(session: Session, team: Team, run_id: str, *, limit: int,
                after: int | None) -> ListPage[EventOut]:
    """Returns the run's events oldest first, after the cursor (an event id)."""
    run = get_owned(session, Run, team, run_id)
    stmt = select(Event).where(Event.run_id == run.id)
    rows, has_more, cursor = paginate(session, stmt, Event.id, limit=limit, after=after, newest_first=False)
    return ListPage[EventOut](data=[EventOut.model_validate(r) for r in rows], has_more=has_more,
                              next_cursor=cursor)
