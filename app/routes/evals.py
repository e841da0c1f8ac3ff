"""Eval routes: create, list, get."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.db.models import Eval
from app.deps import CeleryDep, CurrentTeam, SessionDep, SettingsDep, StoreDep
from app.errors import error_responses
from app.schemas.common import MAX_PAGE, Cursor, ListPage
from app.schemas.evals import EvalCreate, EvalOut
from app.services import evals as service
from app.services.owned import get_owned

router = APIRouter(prefix="/v1/evals", tags=["evals"])


@router.post("", response_model=EvalOut, status_code=201, responses=error_responses(401, 404, 409, 422))
async def create_eval(
    body: EvalCreate,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    celery: CeleryDep,
    team: CurrentTeam,
) -> EvalOut:
    return await service.create_eval_async(session, settings, store, celery, team, body)


@router.get("", response_model=ListPage[EvalOut], responses=error_responses(401, 422))
def list_evals(
    session: SessionDep,
    team: CurrentTeam,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
    after: Cursor = None,
) -> ListPage[EvalOut]:
    return service.list_evals(session, team, limit=limit, after=after)


@router.get("/{eval_id}", response_model=EvalOut, responses=error_responses(401, 404))
def get_eval(eval_id: str, session: SessionDep, team: CurrentTeam) -> EvalOut:
    return service.to_out(get_owned(session, Eval, team, eval_id))
