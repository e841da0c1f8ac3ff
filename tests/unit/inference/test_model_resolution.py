from __future__ import annotations

import pytest

from app.inference.resolution import Alias, parse_alias


@pytest.mark.parametrize(
    ("name", "alias"),
    [
        ("greeter", Alias("greeter")),
        ("greeter:stage-2:step-400", Alias("greeter", stage=2, step=400)),
        ("greeter:step-10", Alias("greeter", step=10)),
        ("greeter:stage-0:merged", Alias("greeter", stage=0, kind="merged")),
        ("run_01abc:stage-1:step-5:adapter", Alias("run_01abc", stage=1, step=5, kind="adapter")),
    ],
)
def test_aliases_name_a_run_stage_step_and_kind(name: str, alias: Alias) -> None:
    assert parse_alias(name) == alias


@pytest.mark.parametrize("name", ["greeter:stage-x", "greeter:step-1:stage-2", ":stage-1", "a:b"])
def test_malformed_aliases_are_not_aliases(name: str) -> None:
    assert parse_alias(name) is None
