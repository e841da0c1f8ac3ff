"""Validation error locations become field paths; discriminated-union tags are dropped."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.errors import loc_to_param
from trainer_core.config import RunSpec

BASE = {"base_model": "m", "stages": [{"method": "sft", "datasets": [{"id": "ds_a"}]}]}


def _param(body: dict) -> str | None:
    with pytest.raises(ValidationError) as info:
        RunSpec.model_validate(body)
    return loc_to_param(("body", *info.value.errors()[0]["loc"]), RunSpec)


def test_stage_field_path_drops_the_method_tag() -> None:
    body = {**BASE, "stages": [BASE["stages"][0], {"method": "dpo", "datasets": [{"id": "d"}], "beta": -1}]}
    assert _param(body) == "stages[1].beta"


def test_adapter_and_nested_reward_paths() -> None:
    assert _param({**BASE, "adapter": {"type": "lora", "r": 0}}) == "adapter.r"
    grpo = {"method": "grpo", "datasets": [{"id": "d"}], "batch_size": 8, "num_generations": 4,
            "reward": {"type": "combined", "functions": [{"type": "regex", "pattern": "("}]}}
    assert _param({**BASE, "stages": [grpo]}) == "stages[0].reward.functions[0].pattern"


def test_field_names_equal_to_tag_values_are_kept() -> None:
    loc = ("body", "stages", 0, "sft", "datasets", 0, "id")
    assert loc_to_param(loc, RunSpec) == "stages[0].datasets[0].id"
    assert loc_to_param(("query", "limit")) == "limit"
    assert loc_to_param(("body",)) is None
