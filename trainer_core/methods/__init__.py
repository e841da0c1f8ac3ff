"""Stage methods by name. Each module exposes ``build(ctx: StageContext) -> StageMethod``.

Modules are imported only when a stage of that method runs, so an SFT run never imports the RL
methods (or their generation/teacher dependencies).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer_core.methods.base import StageContext, StageMethod

METHOD_MODULES: dict[str, str] = {
    "sft": "trainer_core.methods.sft",
    "dpo": "trainer_core.methods.dpo",
    "grpo": "trainer_core.methods.grpo",
    "ppo": "trainer_core.methods.ppo",
    "sad": "trainer_core.methods.sad",
    "reward_model": "trainer_core.methods.reward_model",
}


def build_method(ctx: StageContext) -> StageMethod:
    """Returns the method object for ``ctx.stage.method``, built from the stage context."""
    name = ctx.stage.method
    if name not in METHOD_MODULES:
        raise ValueError(f"unknown stage method {name!r}; known: {sorted(METHOD_MODULES)}")
    return importlib.import_module(METHOD_MODULES[name]).build(ctx)
