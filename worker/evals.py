"""An eval on a worker: claim it, keep its heartbeat, evaluate every model in turn, end it.

Evals are jobs like runs (`app.jobs`): a claim moves a `queued` eval (or a `running` one whose
heartbeat went stale) to `running` and increments `attempt`; every later write of that attempt is
fenced by it. A message for an eval someone else holds (a re-delivery, a reaper re-send) finds no
claim and returns at once; an attempt that lost its lease has its writes refused and stops.
"""

from __future__ import annotations

import logging
import time
from functools import cache
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Eval, Team
from app.db.session import make_session_factory
from app.errors import ApiError
from app.inference.resolution import resolve_model
from app.jobs.lease import StaleAttempt, end_attempt, fence, take
from app.jobs.states import EVAL
from app.schemas.evals import EvalCreate, EvalResults, ModelResult
from app.services.datasets import usable_dataset
from app.settings import Settings, get_settings
from app.storage import LocalBlobStore

log = logging.getLogger("tuneyard.worker.evals")

PROGRESS_EVERY_S = 1.0


@cache
def _services() -> tuple[Settings, sessionmaker[Session], LocalBlobStore]:
    settings = get_settings()
    return settings, make_session_factory(settings), LocalBlobStore(settings.storage_dir)


def run_eval(eval_id: str) -> str:
    """Returns how this delivery of the eval's message ended (the Celery task's whole body)."""
    settings, sessions, store = _services()
    return execute_claimed_eval(eval_id, settings=settings, sessions=sessions, store=store)


def execute_claimed_eval(eval_id: str, *, settings: Settings, sessions: sessionmaker[Session],
                         store: LocalBlobStore) -> str:
    """Returns succeeded|failed, or skipped (not claimable) or superseded (lost its lease)."""
    taken = take(sessions, EVAL, eval_id, settings)
    if taken is None:
        return "skipped"
    claimed, lease = taken
    try:
        return execute_eval(sessions, settings, store, eval_id, claimed.attempt)
    except StaleAttempt:
        log.warning("eval %s: attempt %d was superseded; its results are discarded", eval_id, claimed.attempt)
        return "superseded"
    finally:
        lease.stop()


def save(session: Session, eval_id: str, attempt: int, **values: Any) -> None:
    """Commits `values` with a fresh heartbeat for the attempt that holds the eval; raises StaleAttempt."""
    fence(session, EVAL, eval_id, attempt, **values)
    session.commit()


def results_object(results: list[ModelResult]) -> dict[str, Any]:
    """Returns the stored results: a side-by-side table and each model's metrics and samples."""
    table = [{"model": r.model, **r.metrics} for r in results]
    return EvalResults(table=table, models=results).model_dump(mode="json")


def execute_eval(sessions: sessionmaker[Session], settings: Settings, store: LocalBlobStore, eval_id: str,
                 attempt: int) -> str:
    """Returns the eval's final status after attempt `attempt` evaluated every model; raises
    StaleAttempt when the attempt lost the eval (nothing more of it is written)."""
    # Imported here: torch and the model code load only in the worker that evaluates.
    from app.inference.loading import load_local_model
    from trainer_core.data import load_records
    from trainer_core.evaluation import evaluate
    from trainer_core.modeling import choose_device

    with sessions() as session:
        row = session.get(Eval, eval_id)
        assert row is not None
        team = session.get(Team, row.team_id)
        assert team is not None
        request = EvalCreate.model_validate(row.request)
        current: str | None = None
        try:
            dataset = usable_dataset(session, team, request.dataset_id, param="dataset_id")
            fmt = dataset.format or ""
            records = load_records(store.path_for(dataset.blob_key), fmt)[: request.max_examples]  # type: ignore[arg-type]
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
                        save(session, eval_id, attempt, progress=done)

                outcome = evaluate(
                    local.model, local.tokenizer, records, fmt, request.metrics,
                    generation=request.generation, eos_token_ids=local.eos_token_ids,
                    num_samples=request.num_samples, on_progress=report,
                )
                del local
                results.append(ModelResult(model=current, metrics=outcome.metrics,
                                           num_examples=outcome.num_examples, samples=outcome.samples))
                save(session, eval_id, attempt, results=results_object(results),
                     progress=(index + 1) / len(request.models))
            end_attempt(session, EVAL, eval_id, attempt, "succeeded")
            session.commit()
        except StaleAttempt:
            raise
        except Exception as exc:  # any failure ends the eval with a message the user can act on
            session.rollback()
            log.exception("eval %s failed on model %s", eval_id, current)
            message = exc.message if isinstance(exc, ApiError) else str(exc) or type(exc).__name__
            where = f"model {current}: " if current else ""
            error = {"type": type(exc).__name__, "message": where + message, "model": current}
            end_attempt(session, EVAL, eval_id, attempt, "failed", error)
            session.commit()
            return "failed"
    log.info("eval %s: succeeded (attempt %d)", eval_id, attempt)
    return "succeeded"
