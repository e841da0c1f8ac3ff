"""What this deployment's workers and inference backend can run; a spec they cannot is refused at submit.

A run that asks for something no worker here can do (a 4-bit base without bitsandbytes, SGLang
rollouts without an SGLang server, a LoRA shape the SGLang server cannot serve) would otherwise be
claimed and fail minutes or hours later. The API never imports torch, so it learns the workers'
abilities from settings; a package check (``find_spec``) stands in where the API and the workers
share one environment (the embedded default and the production image).
"""

from __future__ import annotations

import importlib.util

from app.errors import Unprocessable
from app.settings import Settings
from trainer_core.config import FullAdapter, QLoraAdapter, RunSpec

# `--lora-target-modules all` in SGLang v0.5.4 expands to exactly these (REFERENCE.md, SGLang).
SGLANG_LORA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})


def workers_can_quantize(settings: Settings) -> bool:
    """Returns whether workers can load a 4-bit base (setting, else: bitsandbytes installed here)."""
    if settings.worker_quantization is not None:
        return settings.worker_quantization
    return importlib.util.find_spec("bitsandbytes") is not None


def check_deployment_runs(settings: Settings, spec: RunSpec) -> None:
    """Returns when this deployment can train and serve ``spec``; raises Unprocessable naming the field."""
    if isinstance(spec.adapter, QLoraAdapter) and not workers_can_quantize(settings):
        raise Unprocessable(
            "adapter.type 'qlora' needs workers with bitsandbytes (4-bit weights), and this deployment's "
            "workers have none; use adapter.type 'lora', or install bitsandbytes on the workers and set "
            "TUNEYARD_WORKER_QUANTIZATION=true",
            code="unsupported_on_deployment", param="adapter.type",
        )
    for index, stage in enumerate(spec.stages):
        rollout = getattr(stage, "rollout", None)
        if rollout is not None and rollout.engine == "sglang" and not settings.rollout_sglang_url:
            raise Unprocessable(
                f"stages[{index}].rollout.engine 'sglang' needs an SGLang server for rollouts, and this "
                "deployment has none (TUNEYARD_ROLLOUT_SGLANG_URL); use 'local' or 'paged'",
                code="unsupported_on_deployment", param=f"stages[{index}].rollout.engine",
            )
    if settings.inference_backend == "sglang" and not isinstance(spec.adapter, FullAdapter):
        _check_sglang_servable(settings, spec)


def _check_sglang_servable(settings: Settings, spec: RunSpec) -> None:
    adapter = spec.adapter
    assert not isinstance(adapter, FullAdapter)
    if adapter.r > settings.sglang_max_lora_rank:
        raise Unprocessable(
            f"adapter.r {adapter.r} is above the SGLang server's --max-lora-rank "
            f"({settings.sglang_max_lora_rank}), so its checkpoints could not be served here; lower r or "
            "restart SGLang with a larger SGLANG_MAX_LORA_RANK (and TUNEYARD_SGLANG_MAX_LORA_RANK)",
            code="unsupported_on_deployment", param="adapter.r",
        )
    if isinstance(adapter.target_modules, list):
        unservable = sorted(set(adapter.target_modules) - SGLANG_LORA_MODULES)
        if unservable:
            raise Unprocessable(
                f"adapter.target_modules {unservable} cannot be served by SGLang, which loads LoRA on "
                f"{sorted(SGLANG_LORA_MODULES)} only; drop them or use 'all-linear'",
                code="unsupported_on_deployment", param="adapter.target_modules",
            )
