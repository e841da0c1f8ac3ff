"""Which folders make up a model, and whether a folder can load at all (no torch import).

`folder_problems` and `linear_modules` read only config.json, file names and safetensors headers,
so the API checks a run's base model and LoRA targets at submit, and the trainer tells a folder
that can never load (the user's or operator's to fix: no retry) from a passing I/O fault (retried).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


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


def weight_files(folder: Path) -> list[Path]:
    """Returns the weight files of a model folder (safetensors or PyTorch bins), sorted."""
    return sorted({p for pattern in WEIGHT_GLOBS for p in folder.glob(pattern)})


def folder_problems(folder: Path) -> list[str]:
    """Returns what keeps a full model folder from loading: config, weights, tokenizer (empty: none)."""
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    problems = []
    try:
        if not json.loads((folder / "config.json").read_text()).get("model_type"):
            problems.append("config.json has no model_type (is this a transformers model folder?)")
    except FileNotFoundError:
        problems.append("no config.json (a Hugging Face model folder has one)")
    except ValueError as exc:
        problems.append(f"config.json is not valid JSON ({exc})")
    if not weight_files(folder):
        problems.append("no weights (*.safetensors or pytorch_model*.bin)")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        problems.append(f"no tokenizer (one of {', '.join(TOKENIZER_FILES)})")
    return problems


def safetensors_header(path: Path) -> dict[str, Any]:
    """Returns the JSON header of a safetensors file (tensor names, dtypes, shapes): no weights are read."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(length))


def _tensors(folder: Path) -> Iterator[tuple[str, list[int]]]:
    for path in weight_files(folder):
        if path.suffix != ".safetensors":
            continue
        for name, tensor in safetensors_header(path).items():
            if name != "__metadata__":
                yield name, tensor["shape"]


def linear_modules(folder: Path) -> set[str] | None:
    """Returns the dotted names of the modules holding a 2-D weight (linear layers, embeddings).

    None when the folder has no safetensors weights to read them from.
    """
    if not any(p.suffix == ".safetensors" for p in weight_files(folder)):
        return None
    return {name.removesuffix(".weight") for name, shape in _tensors(folder)
            if name.endswith(".weight") and len(shape) == 2}


def missing_target_modules(targets: list[str], modules: set[str]) -> list[str]:
    """Returns the LoRA targets matching no module (peft's rule: the name, or its last dotted parts)."""
    return [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]
