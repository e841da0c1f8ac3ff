"""Run spec defaults a real user gets, and cross-field checks that name the field at fault."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from trainer_core.config import (
    FULL_FINETUNE_LEARNING_RATES,
    GRPOStage,
    LoraAdapter,
    RunSpec,
    SADStage,
)

DATA = [{"id": "ds_a"}]


def _spec(*stages: dict[str, Any], **fields: Any) -> RunSpec:
    return RunSpec.model_validate({"base_model": "m", "stages": list(stages), **fields})


def _error(*stages: dict[str, Any], **fields: Any) -> tuple[tuple[str | int, ...], str]:
    """Returns the location (without the method tag) and message of the spec's first error."""
    with pytest.raises(ValidationError) as info:
        _spec(*stages, **fields)
    first = info.value.errors()[0]
    loc = tuple(part for part in first["loc"] if part not in ("sft", "dpo", "ppo", "grpo", "sad"))
    return loc, first["msg"]


def test_defaults_are_a_sensible_lora_run() -> None:
    spec = _spec({"method": "sft", "datasets": DATA})
    assert spec.adapter == LoraAdapter(r=16, alpha=32, dropout=0.05, target_modules="all-linear")
    assert spec.export == ["adapter"] and spec.checkpoint_every_steps == 200
    stage = spec.stages[0]
    assert (stage.epochs, stage.max_steps) == (1.0, None)  # "every stage takes epochs or max_steps"
    assert (stage.learning_rate, stage.lr_scheduler, stage.max_grad_norm) == (2e-4, "cosine", 1.0)
    assert stage.eval_every_steps is None and stage.eval_fraction == 0.0


def test_learning_rate_defaults_per_method_and_adapter() -> None:
    stages = [{"method": m, "datasets": DATA} for m in ("sft", "dpo", "ppo", "grpo", "sad")]
    lora = _spec(*stages)
    assert [s.learning_rate for s in lora.stages] == [2e-4, 5e-6, 1e-5, 5e-6, 2e-4]

    stages[1] = {**stages[1], "learning_rate": 3e-6}  # a rate the user set is kept as given
    full = _spec(*stages, adapter={"type": "full"}, export=["merged"])
    expected = [FULL_FINETUNE_LEARNING_RATES[s.method] for s in full.stages]
    expected[1] = 3e-6
    assert [s.learning_rate for s in full.stages] == expected
    # The API stores the dumped spec and the worker validates it again: the same rates come back.
    again = RunSpec.model_validate(full.model_dump(mode="json"))
    assert [s.learning_rate for s in again.stages] == expected


def test_grpo_batch_must_hold_whole_groups() -> None:
    loc, msg = _error({"method": "grpo", "datasets": DATA, "batch_size": 6, "num_generations": 4})
    assert loc == ("stages", 0, "num_generations") and "divisible" in msg
    assert GRPOStage(method="grpo", datasets=DATA, batch_size=8, num_generations=4).num_generations == 4


def test_sad_span_weights_are_non_negative_and_not_all_zero() -> None:
    loc, _ = _error({"method": "sad", "datasets": DATA, "span_weights": {"reasoning": -1}})
    assert loc == ("stages", 0, "span_weights", "reasoning")
    _, msg = _error({"method": "sad", "datasets": DATA, "span_weights": {"reasoning": 0, "action": 0}})
    assert "positive weight" in msg
    assert SADStage(method="sad", datasets=DATA, span_weights={"reasoning": 0}).span_weights.action == 1


@pytest.mark.parametrize("method", ["sft", "dpo", "grpo", "sad"])
def test_eval_every_steps_needs_eval_data(method: str) -> None:
    stage = {"method": method, "datasets": DATA, "eval_every_steps": 10, "batch_size": 8}
    loc, msg = _error(stage)
    assert loc == ("stages", 0, "eval_every_steps")
    assert "eval_fraction" in msg and "eval_dataset" in msg
    assert _spec({**stage, "eval_fraction": 0.1}).stages[0].eval_every_steps == 10
    assert _spec({**stage, "eval_dataset": "ds_eval"}).stages[0].eval_every_steps == 10


@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_completion_must_leave_room_for_the_prompt(method: str) -> None:
    stage = {"method": method, "datasets": DATA, "max_seq_len": 256, "max_new_tokens": 256}
    loc, msg = _error(stage)
    assert loc == ("stages", 0, "max_new_tokens") and "max_seq_len (256)" in msg
    assert _spec({**stage, "max_new_tokens": 200}).stages[0].max_new_tokens == 200


def test_length_is_epochs_or_max_steps_not_both() -> None:
    loc, msg = _error({"method": "sft", "datasets": DATA, "epochs": 2, "max_steps": 10})
    assert loc == ("stages", 0, "max_steps") and "not both" in msg


def test_warmup_must_end_before_the_stage_does() -> None:
    loc, msg = _error({"method": "sft", "datasets": DATA, "max_steps": 10, "warmup_steps": 10})
    assert loc == ("stages", 0, "warmup_steps") and "never leave warmup" in msg
    by_epochs = _spec({"method": "sft", "datasets": DATA, "epochs": 1, "warmup_steps": 50})
    assert by_epochs.stages[0].warmup_steps == 50  # the stage length is known only from the data


def test_label_smoothing_is_for_sigmoid_dpo_only() -> None:
    loc, msg = _error({"method": "dpo", "datasets": DATA, "loss_type": "ipo", "label_smoothing": 0.1})
    assert loc == ("stages", 0, "label_smoothing") and "sigmoid" in msg
    assert _spec({"method": "dpo", "datasets": DATA, "label_smoothing": 0.1}).stages[0].label_smoothing == 0.1


def test_full_fine_tuning_exports_merged_only() -> None:
    _, msg = _error({"method": "sft", "datasets": DATA}, adapter={"type": "full"})
    assert "export 'adapter' needs adapter.type 'lora'" in msg


def test_lora_targets_must_name_something() -> None:
    loc, _ = _error({"method": "sft", "datasets": DATA}, adapter={"type": "lora", "target_modules": []})
    assert loc == ("adapter", "lora", "target_modules")


def test_every_run_spec_field_is_described() -> None:
    # The run spec's JSON schema is the public OpenAPI schema of POST /v1/runs.
    schema = RunSpec.model_json_schema()
    models = {"RunSpec": schema, **schema.get("$defs", {})}
    undescribed = [
        f"{name}.{field}" for name, model in models.items()
        for field, prop in model.get("properties", {}).items() if not prop.get("description")
    ]
    assert undescribed == []
