"""Eval execution on a worker: the atomic claim, fenced writes of one attempt, each model in turn.

Evals hold a lease the way runs do (see `app.services.execution`): a claim moves a `queued` eval
(or a `running` one whose heartbeat went stale) to `running` and increments `attempt`; every later
write of that attempt is an UPDATE guarded by `attempt = :attempt AND status = 'running'`, and a
zero row count raises `StaleEvalAttempt`. The reaper re-queues evals whose heartbeat went stale
and fails them once their attempts are spent.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, update
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Eval, Team, utcnow
from app.errors import ApiError
from app.inference.resolution import resolve_model
from app.schemas.evals import EvalCreate, EvalResults, ModelResult
from app.services import outbox
from app.services.evals import usable_dataset
from app.settings import Settings
from app.storage import LocalBlobStore

log = logging.getLogger("tuneyard.evals")

PROGRESS_EVERY_S = 1.0


class StaleEvalAttempt(Exception):
    """This attempt no longer owns the eval (re-queued by the reaper, or claimed again)."""

    def __init__(self, eval_id: str, attempt: int) -> None:
        super().__init__(f"eval {eval_id}: attempt {attempt} no longer holds the lease; writes refused")
        self.eval_id = eval_id
        self.attempt = attempt


def claim_eval(session: Session, eval_id: str, owner: str, now: datetime, *, lease_seconds: float,
               max_attempts: int) -> int | None:
    """Returns the attempt number of a new claim, None when the eval is held, finished or out of attempts."""
    stale_before = now - timedelta(seconds=lease_seconds)
    claimable = or_(
        Eval.status == "queued",
        (Eval.status == "running") & or_(Eval.heartbeat_at.is_(None), Eval.heartbeat_at < stale_before),
    )
    attempt = session.execute(
        update(Eval).where(Eval.id == eval_id, claimable, Eval.attempt < max_attempts)
        .values(status="running", attempt=Eval.attempt + 1, lease_owner=owner, heartbeat_at=now,
                progress=0.0, results=None)
        .returning(Eval.attempt)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    session.commit()
    return attempt


def save_eval(session: Session, eval_id: str, attempt: int, **values: Any) -> None:
    """Commits `values` and a fresh heartbeat for the attempt that holds the eval; raises StaleEvalAttempt."""
    moved = session.execute(
        update(Eval).where(Eval.id == eval_id, Eval.attempt == attempt, Eval.status == "running")
        .values(heartbeat_at=utcnow(), **values)
        .execution_options(synchronize_session=False)
    ).rowcount
    if moved != 1:
        session.rollback()
        raise StaleEvalAttempt(eval_id, attempt)
    if "status" in values:
        outbox.eval_ended(session, eval_id, values["status"])
    session.commit()


def results_object(results: list[ModelResult]) -> dict[str, Any]:
    """Returns the stored results: a side-by-side table and each model's metrics and samples."""
    table = [{"model": r.model, **r.metrics} for r in results]
    return EvalResults(table=table, models=results).model_dump(mode="json")


def execute_eval(sessions: sessionmaker[Session], settings: Settings, store: LocalBlobStore, eval_id: str,
                 attempt: int) -> str:
    """Returns the eval's final status after attempt `attempt` evaluated every model; raises
    StaleEvalAttempt when the attempt lost the eval (nothing more of it is written)."""
    # Imported here: torch and the model code load only in the worker that evaluates.
    from app.inference.loading import load_local_model
    from trainer_core.data import load_records
    from trainer_core.evaluation import GenerationSettings, evaluate
    from trainer_core.modeling import choose_device

    with sessions() as session:
        row = session.get(Eval, eval_id)
        assert row is not None
        team = session.get(Team, row.team_id)
        assert team is not None
        request = EvalCreate.model_validate(row.request)
        current: str | None = None
        try:
            dataset = usable_dataset(session, team, request.dataset_id)
            fmt = dataset.format or ""
            records = load_records(store.path_for(dataset.blob_key), fmt)[: request.max_examples]  # type: ignore[arg-type]
            generation = GenerationSettings(
                **request.generation.model_dump() | {"stop": tuple(request.generation.stop)}
            )
            device = choose_device("auto")
            results: list[ModelResult] = []
            last_report = 0.0
            for index, current in enumerate(request.models):
                local = load_local_model(resolve_model(session, settings, store, team, current), device)

                def report(fraction: float, index: int = index) -> None:
                    nonlocal last_report
                    if time.monotonic() - last_report >= PROGRESS_EVERY_S:
                        last_report = time.monotonic()
                        done = (index + fraction) / len(request.models)
                        save_eval(session, eval_id, attempt, progress=done)

                outcome = evaluate(
                    local.model, local.tokenizer, records, fmt, request.metrics, generation=generation,
                    eos_token_ids=local.eos_token_ids, num_samples=request.num_samples, on_progress=report,
                )
                del local
                results.append(ModelResult(model=current, metrics=outcome.metrics,
                                           num_examples=outcome.num_examples, samples=outcome.samples))
                save_eval(session, eval_id, attempt, results=results_object(results),
                          progress=(index + 1) / len(request.models))
            save_eval(session, eval_id, attempt, status="succeeded", finished_at=utcnow(), lease_owner=None)
        except StaleEvalAttempt:
            raise
        except Exception as exc:  # any failure ends the eval with a message the user can act on
            session.rollback()
            log.exception("eval %s failed on model %s", eval_id, current)
            message = exc.message if isinstance(exc, ApiError) else str(exc) or type(exc).__name__
            where = f"model {current}: " if current else ""
            error = {"type": type(exc).__name__, "message": where + message, "model": current}
            save_eval(session, eval_id, attempt, status="failed", error=error, finished_at=utcnow(),
                      lease_owner=None)
            return "failed"
    log.info("eval %s: succeeded (attempt %d)", eval_id, attempt)
    return "succeeded"
