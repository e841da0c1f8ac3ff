"""Runs the API accepts at the edges of the spec's bounds train, or fail as the user's error, never
as a system error (issue 13's fuzz, the run half; tests/api/test_fuzz_specs.py is the HTTP half).

Hypothesis draws specs inside the accepted domain but at its extremes (huge step counts and
batches, learning rate 1, coefficients at their bounds, arbitrary reward patterns and LoRA
targets); each is submitted through the API's own checks (`create_run`), executed by the worker's
`execute_run` on the tiny model (SQLite, filesystem broker) and cancelled after a few seconds. The
outcome must be succeeded, cancelled, or failed with a user-side code.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sqlalchemy import update

from app.broker import create_celery
from app.db.models import Run, Team
from app.errors import ApiError
from app.services.runs import create_run
from app.settings import Settings
from tests.integration.conftest import PREFERENCE_RECORDS, SFT_RECORDS, embedded_services, stored_dataset
from trainer_core.config import RunSpec
from trainer_core.spec_base import MAX_SEED, MAX_STEPS
from worker.runs import execute_run

USER_SIDE = {"training_data_error", "grader_error", "out_of_memory"}
CANCEL_AFTER_S = 4.0
PROMPTS = [{"prompt": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(8)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict:
    root = tmp_path_factory.mktemp("fuzz-runs")
    config = Settings(data_dir=root / "data", env="test", heartbeat_seconds=0.3)
    sessions, store = embedded_services(config, tiny_model_dir)
    with sessions() as session:
        session.add(Team(id="team_z", name="fuzz"))
        session.flush()
        records = {"sft": SFT_RECORDS, "preference": PREFERENCE_RECORDS, "prompts": PROMPTS}
        datasets = {fmt: stored_dataset(session, store, "team_z", rows, fmt) for fmt, rows in records.items()}
        session.commit()
    yield {"settings": config, "sessions": sessions, "store": store, "datasets": datasets,
           "celery": create_celery(config)}
    sessions.kw["bind"].dispose()


@st.composite
def edge_specs(draw: st.DrawFn, datasets: dict[str, str]) -> dict:
    method = draw(st.sampled_from(["sft", "dpo", "grpo"]))
    fmt = {"sft": "sft", "dpo": "preference", "grpo": "prompts"}[method]
    weight = draw(st.sampled_from([1e-9, 1, 1e6]))
    stage = {"method": method, "datasets": [{"id": datasets[fmt], "weight": weight}],
             "max_steps": draw(st.sampled_from([1, 3, MAX_STEPS])),
             "max_seq_len": draw(st.sampled_from([8, 64])),
             "learning_rate": draw(st.sampled_from([1e-12, 1.0])),
             "weight_decay": draw(st.sampled_from([0.0, 1e4])),
             "max_grad_norm": draw(st.sampled_from([None, 1e-9, 1e6])),
             "batch_size": draw(st.sampled_from([1, 2, 64]))}
    if method == "grpo":
        stage |= {"num_generations": 2, "batch_size": 2, "max_seq_len": 64,
                  "max_new_tokens": draw(st.sampled_from([1, 32])),
                  "temperature": draw(st.sampled_from([1e-4, 1.0, 1e4])),
                  "reward": {"type": "regex", "pattern": draw(st.sampled_from(["(a|aa)+$", "[0-9]", "^$"]))}}
    adapter = draw(st.sampled_from([
        {"type": "lora", "r": 1, "alpha": 1e6, "target_modules": ["lm_head"]},
        {"type": "lora", "r": 64, "target_modules": "all-linear"},
        {"type": "lora", "target_modules": ["q_proj", "down_proj"]}]))
    return {"base_model": "tiny-llama", "seed": draw(st.sampled_from([0, MAX_SEED])), "adapter": adapter,
            "checkpoint_every_steps": draw(st.sampled_from([1, MAX_STEPS])), "stages": [stage]}


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_accepted_edge_specs_train_or_fail_as_the_users_error(stack: dict, data: st.DataObject) -> None:
    body = data.draw(edge_specs(stack["datasets"]))
    try:
        spec = RunSpec.model_validate(body)
        with stack["sessions"]() as session:
            team = session.get(Team, "team_z")
            run, _ = create_run(session, stack["settings"], stack["celery"], team, spec)
    except (ValidationError, ApiError):
        return  # refused at submit: the user hears it at once
    timer = threading.Timer(CANCEL_AFTER_S, _cancel, args=(stack["sessions"], run.id))
    timer.start()
    try:
        outcome = execute_run(run.id, settings=stack["settings"], sessions=stack["sessions"],
                              store=stack["store"], celery=stack["celery"])
    finally:
        timer.cancel()
    with stack["sessions"]() as session:
        error = session.get(Run, run.id).error
    assert outcome in ("succeeded", "cancelled", "failed"), (body, outcome, error)
    if outcome == "failed":
        assert error["code"] in USER_SIDE, (body, error)


def _cancel(sessions, run_id: str) -> None:  # noqa: ANN001 - a sessionmaker
    with sessions() as session:
        session.execute(update(Run).where(Run.id == run_id, Run.status == "running")
                        .values(status="cancelling"))
        session.commit()
