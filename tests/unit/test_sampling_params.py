"""The one sampling-parameters type: eval requests fill what they leave out with the eval defaults."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.schemas.evals import EvalCreate
from trainer_core.config import SamplingParams

REQUEST = {"models": ["m"], "dataset_id": "ds", "metrics": ["exact_match"]}


def test_an_eval_keeps_greedy_defaults_for_fields_it_leaves_out() -> None:
    generation = EvalCreate.model_validate(REQUEST | {"generation": {"max_tokens": 8}}).generation
    assert (generation.max_tokens, generation.temperature, generation.seed) == (8, 0.0, 0)
    default = SamplingParams(max_tokens=128, temperature=0, seed=0)
    assert EvalCreate.model_validate(REQUEST).generation == default
    # A stored request (its generation dumped in full) reads back as it was.
    stored = EvalCreate.model_validate(REQUEST | {"generation": {"temperature": 0.7}}).model_dump(mode="json")
    assert EvalCreate.model_validate(stored).generation.temperature == 0.7


def test_an_eval_refuses_several_completions_per_prompt() -> None:
    with pytest.raises(ValidationError, match="generation.n must be 1"):
        EvalCreate.model_validate(REQUEST | {"generation": {"n": 2}})


def test_sample_i_of_a_seeded_request_uses_seed_plus_i() -> None:
    assert SamplingParams(seed=5).for_sample(2).seed == 7
    assert SamplingParams().for_sample(2).seed is None
