"""Specs this deployment cannot run are refused at submit with a 422 naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.errors import Unprocessable
from app.services.deployment import check_deployment_runs
from app.settings import Settings
from trainer_core.config import RunSpec

STAGES = [{"method": "sft", "datasets": [{"id": "ds_a"}]}]


def _spec(**fields: object) -> RunSpec:
    return RunSpec.model_validate({"base_model": "m", "stages": STAGES, **fields})


def _settings(tmp_path: Path, **fields: object) -> Settings:
    return Settings(data_dir=tmp_path, **fields)


def test_qlora_is_refused_where_workers_cannot_quantize(tmp_path: Path) -> None:
    qlora = _spec(adapter={"type": "qlora", "r": 8})
    with pytest.raises(Unprocessable) as info:
        check_deployment_runs(_settings(tmp_path, worker_quantization=False), qlora)
    assert info.value.status_code == 422 and info.value.param == "adapter.type"
    assert "bitsandbytes" in str(info.value)
    check_deployment_runs(_settings(tmp_path, worker_quantization=True), qlora)
    check_deployment_runs(_settings(tmp_path, worker_quantization=False), _spec())


def test_lora_shapes_sglang_cannot_serve_are_refused_when_it_serves(tmp_path: Path) -> None:
    sglang = _settings(tmp_path, inference_backend="sglang", sglang_url="http://s:30000",
                       sglang_max_lora_rank=32)
    with pytest.raises(Unprocessable) as info:
        check_deployment_runs(sglang, _spec(adapter={"type": "lora", "r": 64}))
    assert info.value.param == "adapter.r" and "--max-lora-rank" in str(info.value)
    with pytest.raises(Unprocessable) as info:
        lm_head = {"type": "lora", "target_modules": ["q_proj", "lm_head"]}
        check_deployment_runs(sglang, _spec(adapter=lm_head))
    assert info.value.param == "adapter.target_modules" and "lm_head" in str(info.value)
    check_deployment_runs(sglang, _spec(adapter={"type": "lora", "r": 32, "target_modules": "all-linear"}))
    # The local backend serves any shape.
    check_deployment_runs(_settings(tmp_path), _spec(adapter={"type": "lora", "target_modules": ["lm_head"]}))
