from __future__ import annotations

from fastapi import APIRouter

from app.deps import CurrentTeam, SessionDep, SettingsDep
from app.errors import error_responses
from app.schemas.models import ModelList
from app.services.fine_tuned_models import fine_tuned_models
from app.services.models import list_models

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=ModelList, responses=error_responses(401))
def get_models(session: SessionDep, settings: SettingsDep, team: CurrentTeam) -> ModelList:
    return ModelList(data=list_models(session, settings, team) + fine_tuned_models(session, team))
