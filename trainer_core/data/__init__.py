"""Datasets for training: record formats and validation (torch-free), rendering, packing, mixtures.

Importing this package stays light: the API imports `records` and `validate` without torch, so the
names below that live in torch/transformers modules are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

# Label value that cross-entropy skips: prompt tokens, padding, and packed-sequence boundaries.
IGNORE_INDEX = -100

_EXPORTS = {
    "detect_format": "records", "normalize": "records", "trajectory_text": "records",
    "RecordError": "records", "validate_jsonl": "validate", "ValidationReport": "validate",
    "load_records": "mixture", "build_mixture": "mixture",
    "RenderedExample": "render", "render_sft": "render", "render_prompt": "render",
    "render_preference": "render", "show_trained_tokens": "render", "truncate": "render",
    "plan_packs": "packing", "collate_packed": "packing", "collate_padded": "packing",
    "length_grouped_batches": "packing",
}
__all__ = ["IGNORE_INDEX", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
