"""Eval jobs: create (validated, then one `tuneyard.run_eval` message on the `eval` queue), read, list,
and the execution the worker runs: each model in turn through `trainer_core.evaluation`.

An eval's models are resolved when it is created, so an alias names the checkpoint it meant then.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from app.broker import send_task
from app.db.models import Dataset, Eval, Team, utcnow
from app.errors import ApiError, Conflict, NotFound, Unprocessable
from app.ids import new_id
from app.inference.resolution import resolve_model
from app.schemas.common import ListPage
from app.schemas.evals import EvalCreate, EvalError, EvalOut, EvalResults, ModelResult
from app.services.pagination import paginate
from app.settings import Settings
from app.storage import LocalBlobStore
from trainer_core.eval_metrics import check_metrics

log = logging.getLogger("tuneyard.evals")

PROGRESS_EVERY_S = 1.0


def to_out(row: Eval) -> EvalOut:
    """Returns the API object of an eval row."""
    request = EvalCreate.model_validate(row.request)
    return EvalOut(
        id=row.id,
        name=request.name,
        status=row.status,  # type: ignore[arg-type]
        models=request.models,
        dataset_id=request.dataset_id,
        metrics=request.metrics,
        generation=request.generation,
        max_examples=request.max_examples,
        progress=row.progress,
        results=EvalResults.model_validate(row.results) if row.results else None,
        error=EvalError.model_validate(row.error) if row.error else None,
        created_at=row.created_at,
        finished_at=row.finished_at,
    )


def _usable_dataset(session: Session, team: Team, dataset_id: str) -> Dataset:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.team_id != team.id:
        raise NotFound(f"no dataset {dataset_id!r}", code="dataset_not_found", param="dataset_id")
    if dataset.status == "validating":
        raise Conflict(
            f"dataset {dataset_id} is still validating; retry when it is ready",
            code="dataset_not_ready",
            param="dataset_id",
        )
    if dataset.status != "ready" or dataset.format is None:
        raise Unprocessable(
            f"dataset {dataset_id} is {dataset.status}; fix the file and upload it again",
            code="dataset_invalid",
            param="dataset_id",
        )
    return dataset


def create_eval(
    session: Session, settings: Settings, store: LocalBlobStore, celery: Celery, team: Team, body: EvalCreate
) -> Eval:
    """Returns the new `queued` eval after checking its dataset, metrics and models, and queues it."""
    dataset = _usable_dataset(session, team, body.dataset_id)
    try:
        check_metrics(body.metrics, dataset.format or "")
    except ValueError as exc:
        raise Unprocessable(str(exc), code="invalid_metric", param="metrics") from exc
    resolved = []
    for i, name in enumerate(body.models):
        try:
            resolved.append(resolve_model(session, settings, store, team, name).id)
        except ApiError as exc:
            exc.param = f"models[{i}]"
            raise
    request = body.model_copy(update={"models": list(dict.fromkeys(resolved))})
    row = Eval(id=new_id("eval"), team_id=team.id, status="queued", request=request.model_dump(mode="json"))
    session.add(row)
    session.commit()
    send_task(celery, "tuneyard.run_eval", [row.id])
    return row


def get_eval(session: Session, team: Team, eval_id: str) -> Eval:
    """Returns the team's eval; 404 for a missing one or another team's."""
    row = session.get(Eval, eval_id)
    if row is None or row.team_id != team.id:
        raise NotFound(f"no eval {eval_id!r}", param="eval_id")
    return row


def list_evals(session: Session, team: Team, *, limit: int, after: str | None) -> ListPage[EvalOut]:
    stmt = select(Eval).where(Eval.team_id == team.id)
    rows, has_more, cursor = paginate(session, stmt, Eval.id, limit=limit, after=after)
    return ListPage[EvalOut](data=[to_out(r) for r in rows], has_more=has_more, next_cursor=cursor)


async def create_eval_async(
    session: Session, settings: Settings, store: LocalBlobStore, celery: Celery, team: Team, body: EvalCreate
) -> EvalOut:
    """Returns the created eval (database and broker work run off the event loop)."""
    row = await run_in_threadpool(create_eval, session, settings, store, celery, team, body)
    return to_out(row)


# ---------------------------------------------------------------- execution (worker side)


def results_object(results: list[ModelResult]) -> dict[str, Any]:
    """Returns the stored results: a side-by-side table and each model's metrics and samples."""
    table = [{"model": r.model, **r.metrics} for r in results]
    return EvalResults(table=table, models=results).model_dump(mode="json")


def _claim(session: Session, eval_id: str) -> bool:
    claimed = session.execute(
        update(Eval).where(Eval.id == eval_id, Eval.status == "queued").values(status="running", progress=0.0)
    ).rowcount
    session.commit()
    return bool(claimed)


def execute_eval(
    sessions: sessionmaker[Session], settings: Settings, store: LocalBlobStore, eval_id: str
) -> str | None:
    """Returns the eval's final status after evaluating every model, or None when it was not `queued`
    (a re-delivered message, or an eval already taken by another worker)."""
    # Imported here: torch and the model code load only in the worker that evaluates.
    from app.inference.loading import load_local_model
    from trainer_core.data import load_records
    from trainer_core.evaluation import GenerationSettings, evaluate
    from trainer_core.modeling import choose_device

    with sessions() as session:
        if not _claim(session, eval_id):
            log.info("eval %s: not queued any more, skipped", eval_id)
            return None
        row = session.get(Eval, eval_id)
        assert row is not None
        team = session.get(Team, row.team_id)
        assert team is not None
        request = EvalCreate.model_validate(row.request)
        current: str | None = None
        try:
            dataset = _usable_dataset(session, team, request.dataset_id)
            fmt = dataset.format or ""
            records = load_records(store.path_for(dataset.blob_key), fmt)[: request.max_examples]  # type: ignore[arg-type]
            generation = GenerationSettings(
                **request.generation.model_dump() | {"stop": tuple(request.generation.stop)}
            )
            device = choose_device("auto")
            results: list[ModelResult] = []
            last_report = 0.0
            for index, current in enumerate(request.models):
                resolved = resolve_model(session, settings, store, team, current)
                local = load_local_model(resolved, device)

                def report(fraction: float, index: int = index) -> None:
                    nonlocal last_report
                    if time.monotonic() - last_report >= PROGRESS_EVERY_S:
                        last_report = time.monotonic()
                        row.progress = (index + fraction) / len(request.models)
                        session.commit()

                outcome = evaluate(
                    local.model,
                    local.tokenizer,
                    records,
                    fmt,
                    request.metrics,
                    generation=generation,
                    eos_token_ids=local.eos_token_ids,
                    num_samples=request.num_samples,
                    on_progress=report,
                )
                del local
                results.append(
                    ModelResult(
                        model=current,
                        metrics=outcome.metrics,
                        num_examples=outcome.num_examples,
                        samples=outcome.samples,
                    )
                )
                row.results = results_object(results)
                row.progress = (index + 1) / len(request.models)
                session.commit()
            row.status = "succeeded"
        except Exception as exc:  # any failure ends the eval with a message the user can act on
            session.rollback()
            log.exception("eval %s failed on model %s", eval_id, current)
            message = exc.message if isinstance(exc, ApiError) else str(exc) or type(exc).__name__
            where = f"model {current}: " if current else ""
            row.status = "failed"
            row.error = {"type": type(exc).__name__, "message": where + message, "model": current}
        row.finished_at = utcnow()
        session.commit()
        log.info("eval %s: %s", eval_id, row.status)
        return row.status
