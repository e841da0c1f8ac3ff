"""Eval jobs: create (validated, then one `tuneyard.run_eval` message on the `eval` queue), read, list.
The worker's side (claim, fenced writes, evaluation) is in `app.services.eval_execution`.

An eval's models are resolved when it is created, so an alias names the checkpoint it meant then.
"""

from __future__ import annotations

from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.broker import send_task
from app.db.models import Dataset, Eval, Team
from app.errors import ApiError, Conflict, NotFound, Unprocessable
from app.ids import is_id, new_id
from app.inference.resolution import resolve_model
from app.schemas.common import ListPage
from app.schemas.evals import EvalCreate, EvalError, EvalOut, EvalResults
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


def usable_dataset(session: Session, team: Team, dataset_id: str) -> Dataset:
    """Returns the team's ready dataset; 404 when missing, 409 while validating, 422 when invalid."""
    dataset = session.get(Dataset, dataset_id) if is_id(dataset_id, "ds") else None
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
    dataset = usable_dataset(session, team, body.dataset_id)
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
    row = session.get(Eval, eval_id) if is_id(eval_id, "eval") else None
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
