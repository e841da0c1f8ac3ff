"""Property-based fuzzing of the OpenAPI spec (schemathesis): no 5xx, every response matches its schema.

Runs against an authenticated app on a fresh SQLite database (uploads stay `validating`: no
worker is needed to check the HTTP contract). The app is built at import because schemathesis
loads the schema when the module is collected; the database is migrated and the key created
by a module fixture before the first case runs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from app.db.migrate import migrate
from app.main import create_app
from app.services.auth import create_api_key
from app.settings import Settings
from tests.api.conftest import write_model_folder

# Random examples where people run the suite, the same ones in CI (CI=true): a submission must not
# fail on a draw; a failure found locally reproduces from the seed hypothesis prints.
IN_CI = os.environ.get("CI") == "true"
MAX_EXAMPLES = 12

_ROOT = Path(tempfile.mkdtemp(prefix="tuneyard-fuzz-"))
_SETTINGS = Settings(data_dir=_ROOT / "data", base_models_dir=_ROOT / "models", env="test",
                     max_upload_bytes=1024 * 1024, broker_url="filesystem://")
APP = create_app(_SETTINGS)
# POST /v1/graders/run executes what it is given (sandboxed programs, judge calls), ~75 ms a case:
# the coverage phase's ~1,100 boundary cases of it took 82 s, so it gets more fuzzed cases instead.
# The OpenAI alpha aliases of the grader routes share their handlers (tests/api/test_graders.py runs
# both prefixes) and are not fuzzed twice.
ALIASES = r"^/v1/fine_tuning/alpha/"
RUN_GRADER = {"path": "/v1/graders/run", "method": "POST"}
schema = (schemathesis.openapi.from_asgi("/openapi.json", APP)
          .exclude(path_regex=ALIASES).exclude(**RUN_GRADER))
grader_run_schema = schemathesis.openapi.from_asgi("/openapi.json", APP).include(**RUN_GRADER)
grader_run_schema.config.phases.coverage.enabled = False
CALLS: list[int] = []


@schemathesis.serializer("application/jsonl", "application/x-ndjson")
def _jsonl(ctx: schemathesis.SerializationContext, value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


@pytest.fixture(scope="module")
def auth_headers() -> Iterator[dict[str, str]]:
    write_model_folder(_ROOT / "models" / "tiny-llama")
    migrate(_SETTINGS.database_url)
    with APP.state.sessions() as session:
        _, key = create_api_key(session, "fuzz")
    headers = {"Authorization": f"Bearer {key}"}
    with TestClient(APP) as client:  # one real dataset, so list/preview have something to return
        client.post("/v1/datasets", content=b'{"text": "seed"}\n',
                    headers={**headers, "Content-Type": "application/jsonl"})
    yield headers
    print(f"\nschemathesis: {len(CALLS)} requests, none 5xx or off-schema")
    APP.state.sessions.kw["bind"].dispose()
    shutil.rmtree(_ROOT, ignore_errors=True)


@schemathesis.check
def no_server_error_but_the_absent_judge(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                                         case: schemathesis.Case) -> bool | None:
    """not_a_server_error, except the one documented 503: no inference server runs beside this app, so
    a score_model grader on this service's own judge endpoint is answered `judge_unavailable`."""
    if (response.status_code == 503 and case.path.endswith("/graders/run")
            and response.json()["error"]["code"] == "judge_unavailable"):
        return True
    return not_a_server_error(ctx, response, case)


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=IN_CI,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_api_conforms_to_its_schema(case: schemathesis.Case, auth_headers: dict[str, str]) -> None:
    _call(case, auth_headers)


@grader_run_schema.parametrize()
@settings(max_examples=MAX_EXAMPLES * 5, deadline=None, derandomize=IN_CI,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_running_a_grader_conforms_to_its_schema(case: schemathesis.Case,
                                                 auth_headers: dict[str, str]) -> None:
    _call(case, auth_headers)


def _call(case: schemathesis.Case, auth_headers: dict[str, str]) -> None:
    CALLS.append(1)
    case.call_and_validate(headers={**(case.headers or {}), **auth_headers},
                           checks=[no_server_error_but_the_absent_judge, response_schema_conformance])
