"""Loads datasets as canonical records and mixes several into one weighted training set plus a held-out split.

Mixture semantics: a source's weight is its relative share of one epoch's examples, and an epoch
has as many examples as the sources' training pools hold together. A source whose share exceeds
its pool is repeated (each pass over it in a fresh shuffled order); one whose share is smaller is
subsampled without replacement. Equal weights over unequal datasets therefore oversample the
small one; weights proportional to the sizes reproduce plain concatenation.

The held-out split is taken from each source before mixing, and any training record equal to a
held-out one (same canonical JSON) is removed, so no evaluation record is ever trained on.
Everything is deterministic given `seed`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from trainer_core.config import DatasetFormat
from trainer_core.data.records import RecordError, normalize
from trainer_core.errors import TrainingDataError

Record = dict[str, Any]
_BOM = b"\xef\xbb\xbf"


def load_records(path: Path, fmt: DatasetFormat) -> list[Record]:
    """Returns the canonical records of a JSONL file; raises TrainingDataError naming the bad line."""
    records: list[Record] = []
    with Path(path).open("rb") as f:
        for number, raw in enumerate(f, start=1):
            line = raw.removeprefix(_BOM) if number == 1 else raw
            if not line.strip():
                continue
            try:
                records.append(normalize(orjson.loads(line), fmt))
            except orjson.JSONDecodeError as exc:
                raise TrainingDataError(f"{Path(path).name} line {number}: invalid JSON: {exc}") from None
            except RecordError as exc:
                raise TrainingDataError(f"{Path(path).name} line {number}: {exc}") from None
    return records


def _key(record: Record) -> bytes:
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


def _quotas(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Returns each source's example count: shares of sum(sizes) by weight (largest remainder)."""
    total, weight_sum = sum(sizes), sum(weights)
    exact = [total * w / weight_sum for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _draw(pool: list[Record], count: int, rng: random.Random) -> list[Record]:
    drawn: list[Record] = []
    while len(drawn) < count:
        order = pool[:]
        rng.shuffle(order)
        drawn += order[: count - len(drawn)]
    return drawn


def build_mixture(
    sources: Sequence[tuple[Sequence[Record], float]], eval_fraction: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """Returns (train, eval): one epoch of the weighted, shuffled mixture and the held-out records.

    Each source holds out round(eval_fraction · size) records (at least one when eval_fraction > 0
    and the source has two or more); see the module docstring for the weighting.
    """
    if not sources:
        raise ValueError("a mixture needs at least one source")
    if any(weight <= 0 for _, weight in sources):
        raise ValueError("mixture weights must be positive")
    rng = random.Random(seed)
    pools: list[list[Record]] = []
    held_out: list[Record] = []
    for records, _ in sources:
        order = list(records)
        rng.shuffle(order)
        n_eval = round(eval_fraction * len(order))
        if eval_fraction > 0 and len(order) >= 2:
            n_eval = max(n_eval, 1)
        held_out += order[:n_eval]
        pools.append(order[n_eval:])
    held_keys = {_key(r) for r in held_out}
    if held_keys:
        pools = [[r for r in pool if _key(r) not in held_keys] for pool in pools]
    nonempty = [(pool, weight) for pool, (_, weight) in zip(pools, sources, strict=True) if pool]
    if not nonempty:
        return [], held_out
    quotas = _quotas([len(p) for p, _ in nonempty], [w for _, w in nonempty])
    train = [r for (pool, _), count in zip(nonempty, quotas, strict=True) for r in _draw(pool, count, rng)]
    rng.shuffle(train)
    return train, held_out
