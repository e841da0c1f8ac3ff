"""API key routes: a team lists its keys and revokes its own."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.deps import CurrentTeam, SessionDep
from app.errors import error_responses
from app.schemas.common import ListPage
from app.schemas.keys import ApiKeyOut
from app.services import auth

router = APIRouter(prefix="/v1/keys", tags=["keys"])


@router.get("", response_model=ListPage[ApiKeyOut], responses=error_responses(401))
def list_keys(session: SessionDep, team: CurrentTeam) -> ListPage[ApiKeyOut]:
    """The team's API keys, oldest first, revoked ones included."""
    keys = [ApiKeyOut.model_validate(key) for key, _ in auth.list_keys(session, team.id)]
    return ListPage[ApiKeyOut](data=keys, has_more=False, next_cursor=None)


@router.delete("/{key_id}", response_model=ApiKeyOut, responses=error_responses(401, 404))
def revoke_key(key_id: str, request: Request, session: SessionDep, team: CurrentTeam) -> ApiKeyOut:
    """Revokes one of the team's keys (the calling key too): it answers 401 from now on."""
    key = auth.revoke_key(session, key_id, team.id)
    request.app.state.keys.forget(key.id)
    return ApiKeyOut.model_validate(key)
