"""The base of every run-spec model, and the bounds its numbers must stay within.

A spec is stored as JSON in the database and replayed by the trainer, possibly attempts later, so
anything the JSON, the database or the trainer cannot hold must be refused when the spec is
submitted, naming the field: non-finite floats (JSON has no Infinity), NUL characters (PostgreSQL
text cannot hold them), integers past what a column or a seed accepts, sizes that cannot fit in
memory. Torch-free: the API validates specs on its request path.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

# Upper bounds of the spec's numbers. Each is far beyond any sensible run and far within what the
# database columns (32-bit step counters), numpy/torch seeds and a worker's memory can hold.
MAX_STEPS = 10_000_000
MAX_EPOCHS = 1_000
MAX_BATCH = 4_096  # sequences (or completions) in one micro-batch
MAX_BATCH_TOKENS = 2**22  # batch_size x max_seq_len: what one micro-batch may hold
MAX_ACCUMULATION = 1_024
MAX_SEQ_LEN = 131_072
MAX_NEW_TOKENS = 32_768
MAX_GENERATIONS = 256
MAX_SEED = 2**32 - 1  # numpy's seed range; torch accepts it too
MAX_WEIGHT = 1e6  # dataset mixture and reward weights: their sums must stay finite
MAX_COEF = 1e4  # loss coefficients (beta, alpha, vf_coef, ...) and temperatures
MAX_LIST = 64  # datasets of a stage, target modules, reward functions, markers


def nul_path(value: Any, path: str = "") -> str | None:
    """Returns the path (`[2].id`) of the first string holding a NUL character inside `value`."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        sub = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}"
        if (found := nul_path(item, sub)) is not None:
            return found
    return None


class InputModel(BaseModel):
    """A model of user input: finite numbers only, no NUL in any text (the API's request bodies too)."""

    model_config = ConfigDict(allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        # Nested models run this on their own fields; here only plain values are walked.
        if not isinstance(value, BaseModel) and (where := nul_path(value)) is not None:
            raise ValueError(f"text must not contain NUL characters{f' (at {where})' if where else ''}")
        return value


class SpecModel(InputModel):
    """A run-spec model: strict (unknown fields refused) and frozen as well."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
