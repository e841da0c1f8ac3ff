"""Eval jobs: create (validated, then one `tuneyard.run_eval` message on the `eval` queue), read, list.
The worker's side (claim, fenced writes, evaluation) is in `worker.evals`.

An eval's models are resolved when it is created, so an alias names the checkpoint it meant then.
"""

from __future__ import annotations

from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.broker import send_task
from app.db.models import Eval, Team
from app.errors import ApiError, Unprocessable
from app.ids import new_id
from app.inference.resolution import resolve_model
from app.schemas.common import ListPage
from app.schemas.evals import EvalCreate, EvalError, EvalOut, EvalResults
from app.services.datasets import usable_dataset
from app.services.pagination import paginate
from app.settings import Settings
from app.storage import LocalBlobStore
from trainer_core.eval_metrics import check_metrics


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


def create_eval(
    session: Session, settings: Settings, store: LocalBlobStore, celery: Celery, team: Team, body: EvalCreate
) -> Eval:
    """Returns the new `queued` eval after checking its dataset, metrics and models, and queues it."""
    dataset = usable_dataset(session, team, body.dataset_id, param="dataset_id")
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
