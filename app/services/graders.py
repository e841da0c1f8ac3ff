"""Try a grader before a run: validate its spec, or score one sample against one record.

The grader runs here, in the API process, exactly as in training (``trainer_core.graders``): python
and code_output in the sandbox, score_model against its endpoint (default: this server's own
``/v1`` with the caller's key), reward_model on a finished reward-model checkpoint of the team.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.orm import Session

from app.db.models import Team
from app.errors import NotFound, ServiceUnavailable, Unprocessable
from app.schemas.graders import (
    GraderRunIn,
    GraderRunMetadata,
    GraderRunOut,
    GraderValidateIn,
    GraderValidateOut,
)
from app.services.models import reward_model_checkpoint
from app.settings import Settings
from app.storage import LocalBlobStore
from trainer_core.errors import GraderFailure
from trainer_core.grader_config import MultiGrader, RewardModelGrader, ScoreModelGrader
from trainer_core.graders.judge import JudgeUnavailable
from trainer_core.graders.sandbox import SandboxUnavailable
from trainer_core.graders.scoring import GraderRuntime, RewardModelScorer, build_grader, needs_sandbox


def validate_grader(body: GraderValidateIn) -> GraderValidateOut:
    """Returns the grader as the server understands it (defaults filled); invalid ones never get here."""
    return GraderValidateOut(grader=body.grader.model_dump(mode="json", exclude_none=True))


def _reward_model_loader(session: Session, team: Team, store: LocalBlobStore):  # noqa: ANN202
    def load(spec: RewardModelGrader) -> RewardModelScorer:
        from trainer_core.reward_models import load_reward_model_scorer  # torch: only when used

        checkpoint = reward_model_checkpoint(session, team, spec.model)
        if checkpoint is None:
            raise NotFound(f"no finished reward_model checkpoint {spec.model!r}", param="grader.model")
        return load_reward_model_scorer(store.path_for(checkpoint.blob_prefix), spec.batch_size)

    return load


def run_grader(
    session: Session, settings: Settings, store: LocalBlobStore, team: Team, api_key: str | None,
    body: GraderRunIn,
) -> GraderRunOut:
    """Returns the score of ``body.model_sample`` against ``body.item``, with each sub-grader's score."""
    runtime = GraderRuntime(
        judge_base_url=settings.default_judge_url, judge_api_key=settings.judge_api_key or api_key,
        reward_model=_reward_model_loader(session, team, store),
    )
    started = time.monotonic()
    try:
        scores = build_grader(body.grader, runtime)([body.model_sample], [body.item])
    except JudgeUnavailable as exc:
        if _names_its_own_judge(body.grader):  # the caller's endpoint, not this service, is down
            raise Unprocessable(str(exc), code="judge_unreachable", param="grader") from None
        raise ServiceUnavailable(str(exc), code="judge_unavailable", param="grader") from None
    except SandboxUnavailable as exc:
        raise ServiceUnavailable(str(exc), code="sandbox_unavailable", param="grader") from None
    except GraderFailure as exc:
        raise Unprocessable(str(exc), code="invalid_grader", param="grader") from None
    elapsed = time.monotonic() - started
    grader = body.grader
    per_grader = _first(scores.components)
    sub_rewards = {k: v for k, v in per_grader.items() if k != grader.label} if isinstance(
        grader, MultiGrader) else {}
    return GraderRunOut(
        reward=scores.totals[0],
        metadata=GraderRunMetadata(
            name=grader.label, type=grader.type, errors=scores.messages, execution_time=elapsed,
            scores=per_grader, sandbox=runtime.sandbox().describe() if needs_sandbox(grader) else None,
        ),
        sub_rewards=sub_rewards,
    )


def _names_its_own_judge(grader: Any) -> bool:
    """Returns whether a score_model grader (or one inside a multi) names its own ``base_url``."""
    if isinstance(grader, MultiGrader):
        return any(_names_its_own_judge(sub) for sub in grader.graders.values())
    return isinstance(grader, ScoreModelGrader) and grader.base_url is not None


def _first(components: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    return {name: values[0] for name, values in components.items()}
