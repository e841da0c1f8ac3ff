"""Property-based fuzz of the run-spec and eval schemas (issue 13) on SQLite and PostgreSQL.

Hostile bodies (tests/api/fuzz_specs.py: NUL, non-finite numbers, huge integers, huge lists) must
never get a 5xx, and a spec the API accepts must be one the worker can run: it re-validates from
the stored JSON exactly as the worker parses it (a spec the worker could not parse would fail as a
system error, attempt after attempt). Whether accepted specs train or fail as the user's error is
checked by running them: tests/integration/test_fuzz_runs.py.
"""

from __future__ import annotations

import os

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from app.db.models import Run
from tests.api.conftest import Backend, upload_jsonl, wait_for_dataset
from tests.api.fuzz_specs import eval_requests, run_specs
from trainer_core.config import RunSpec

EXAMPLES = 60
FORMATS = {
    "sft": b'{"prompt": "2+2=", "completion": "4"}\n' * 4,
    "preference": b'{"prompt": "2+2=", "chosen": "4", "rejected": "5"}\n' * 4,
    "prompts": b'{"prompt": "2+2=", "answer": "4"}\n' * 4,
    "trajectories": b'{"text": "Thought: add.\\nAction: answer[4]"}\n' * 4,
}
METHOD_FORMAT = {"sft": "sft", "dpo": "preference", "grpo": "prompts", "ppo": "prompts",
                 "sad": "trajectories"}
# Random examples where people run the suite, the same ones in CI (CI=true): a submission must not
# fail on a draw; a failure found locally reproduces from the seed hypothesis prints.
IN_CI = os.environ.get("CI") == "true"
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=IN_CI,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture
def ready(client: TestClient, auth: dict) -> dict[str, str]:
    """Returns a ready dataset id per stage method."""
    ids = {fmt: upload_jsonl(client, auth, body, format=fmt)["id"] for fmt, body in FORMATS.items()}
    for dataset_id in ids.values():
        assert wait_for_dataset(client, auth, dataset_id)["status"] == "ready"
    return {method: ids[fmt] for method, fmt in METHOD_FORMAT.items()}


def test_hostile_run_specs_get_no_5xx_and_accepted_ones_reparse(
        client: TestClient, auth: dict, ready: dict, backend: Backend) -> None:
    statuses: dict[int, int] = {}

    @FUZZ
    @given(body=run_specs(ready))
    def check(body: str) -> None:
        response = client.post("/v1/runs", content=body, headers={**auth, "Content-Type": "application/json"})
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, (body[:500], response.text)
        assert "error" in response.json() or response.status_code == 201
        if response.status_code == 201:
            with backend.app.state.sessions() as session:
                stored = session.get(Run, response.json()["id"]).spec
            RunSpec.model_validate(stored)  # what the worker does first

    check()
    assert statuses.get(422, 0) > 0 and sum(statuses.values()) >= EXAMPLES, statuses


def test_hostile_eval_requests_get_no_5xx(client: TestClient, auth: dict, ready: dict) -> None:
    @FUZZ
    @given(body=eval_requests(ready["sft"]))
    def check(body: str) -> None:
        response = client.post("/v1/evals", content=body,
                               headers={**auth, "Content-Type": "application/json"})
        assert response.status_code < 500, (body[:500], response.text)

    check()
