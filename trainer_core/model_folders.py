"""Which folders make up a model: full weights, optionally with a LoRA adapter over them (no torch import)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelFolders:
    """A model as folders: full weights (a base or merged model), optionally with a LoRA adapter over them."""

    weights: Path
    adapter: Path | None = None

    @classmethod
    def of(cls, folder: Path) -> ModelFolders:
        """Returns the model a folder holds; a PEFT adapter folder applies to the base its config names."""
        adapter_config = folder / "adapter_config.json"
        if not adapter_config.is_file():
            return cls(folder)
        return cls(Path(json.loads(adapter_config.read_text())["base_model_name_or_path"]), folder)
