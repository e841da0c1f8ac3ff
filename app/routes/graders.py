"""Grader routes: validate a grader spec, or run it on one sample (also under OpenAI's alpha path)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.security import HTTPAuthorizationCredentials

from app.deps import CurrentTeam, SessionDep, SettingsDep, StoreDep, bearer
from app.errors import error_responses
from app.schemas.graders import GraderRunIn, GraderRunOut, GraderValidateIn, GraderValidateOut
from app.services import graders as service

router = APIRouter(tags=["graders"])
PREFIXES = ("/v1/graders", "/v1/fine_tuning/alpha/graders")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def validate_grader(body: GraderValidateIn, team: CurrentTeam) -> GraderValidateOut:
    return service.validate_grader(body)


def run_grader(
    body: GraderRunIn, session: SessionDep, settings: SettingsDep, store: StoreDep, team: CurrentTeam,
    credentials: Credentials,
) -> GraderRunOut:
    api_key = credentials.credentials if credentials else None
    return service.run_grader(session, settings, store, team, api_key, body)


for prefix in PREFIXES:
    router.add_api_route(f"{prefix}/validate", validate_grader, methods=["POST"],
                         response_model=GraderValidateOut, responses=error_responses(401, 422))
    router.add_api_route(f"{prefix}/run", run_grader, methods=["POST"], response_model=GraderRunOut,
                         responses=error_responses(401, 404, 422, 503))
