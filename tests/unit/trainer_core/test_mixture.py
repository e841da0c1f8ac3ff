from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from trainer_core.data.mixture import build_mixture, load_records
from trainer_core.errors import TrainingDataError


def _records(tag: str, n: int) -> list[dict]:
    return [{"text": f"{tag}{i}"} for i in range(n)]


def _source(record: dict) -> str:
    return record["text"][0]


def test_weights_are_shares_of_one_epoch() -> None:
    train, held = build_mixture([(_records("a", 300), 0.7), (_records("b", 100), 0.3)], 0.0, seed=1)
    assert held == [] and len(train) == 400
    assert Counter(map(_source, train)) == {"a": 280, "b": 120}
    # b's share (120) exceeds its 100 records: each record appears once or twice.
    assert set(Counter(r["text"] for r in train if r["text"][0] == "b").values()) == {1, 2}


def test_single_source_is_a_shuffle_of_itself() -> None:
    records = _records("a", 50)
    train, _ = build_mixture([(records, 1.0)], 0.0, seed=0)
    assert sorted(r["text"] for r in train) == sorted(r["text"] for r in records)
    assert train != records


def test_held_out_split_is_deterministic_and_disjoint() -> None:
    dup = {"text": "a0"}
    sources = [(_records("a", 100) + [dup], 1.0), (_records("b", 20), 1.0)]
    train, held = build_mixture(sources, 0.1, seed=5)
    again = build_mixture(sources, 0.1, seed=5)
    assert (train, held) == again
    assert Counter(map(_source, held)) == {"a": 10, "b": 2}
    held_texts = {r["text"] for r in held}
    assert not held_texts & {r["text"] for r in train}
    assert build_mixture(sources, 0.1, seed=6)[1] != held


def test_load_records_normalises_and_names_the_bad_line(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_bytes(
        b'\xef\xbb\xbf{"prompt": "1+1=", "answer": 2}\r\n\n{"messages": [{"role": "user", "content": "x"}]}\n'
    )
    assert load_records(good, "prompts") == [
        {"prompt": "1+1=", "answer": "2", "difficulty": None},
        {"messages": [{"role": "user", "content": "x"}], "answer": None, "difficulty": None},
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"messages": []}\n')
    with pytest.raises(TrainingDataError, match="bad.jsonl line 2: messages"):
        load_records(bad, "sft")
