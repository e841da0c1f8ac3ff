from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from trainer_core.data import IGNORE_INDEX
from trainer_core.data.packing import (
    collate_flat,
    collate_packed,
    collate_padded,
    length_grouped_batches,
    plan_packs,
)
from trainer_core.data.render import RenderedExample
from trainer_core.modeling import document_mask, use_attention


def _example(ids: list[int], trained_from: int = 1) -> RenderedExample:
    return RenderedExample(ids, [int(i >= trained_from) for i in range(len(ids))])


def test_best_fit_decreasing_fills_rows() -> None:
    lengths = [5, 3, 7, 2, 1, 6]
    rows = plan_packs(lengths, 8)
    assert sorted(i for row in rows for i in row) == list(range(6))
    assert all(sum(lengths[i] for i in row) <= 8 for row in rows)
    assert len(rows) == 3  # 24 tokens in rows of 8: perfect fit
    with pytest.raises(ValueError, match="more than max_len"):
        plan_packs([9], 8)


def test_labels_are_shifted_and_never_cross_a_boundary() -> None:
    a, b = _example([10, 11, 12]), _example([20, 21], trained_from=0)
    batch = collate_packed([[a, b]], pad_token_id=0, pad_to=7)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21, 0, 0]]
    # a's last token does not predict b's first (trained) token; padding predicts nothing.
    assert batch["labels"].tolist() == [[11, 12, IGNORE_INDEX, 21, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert batch["seq_lengths"].tolist() == [3, 2, 2] and batch["cu_seqlens"].tolist() == [0, 3, 5, 7]
    assert batch["num_tokens"] == 5
    allowed = batch["attention_mask"][0, 0] == 0
    assert allowed[3].tolist() == [False, False, False, True, False, False, False]
    assert allowed[2].tolist() == [True, True, True, False, False, False, False]


def test_padded_collate_has_the_same_keys() -> None:
    a, b = _example([10, 11, 12]), _example([20, 21])
    packed = collate_packed([[a], [b]], pad_token_id=0)
    padded = collate_padded([a, b], pad_token_id=0)
    assert padded.keys() == packed.keys()
    assert padded["labels"].tolist() == packed["labels"].tolist() == [[11, 12, -100], [21, -100, -100]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert padded["cu_seqlens"].tolist() == [0, 3, 5, 6]


def test_length_grouped_batches_are_deterministic_and_complete() -> None:
    lengths = [(i * 37) % 101 for i in range(500)]
    batches = length_grouped_batches(lengths, 4, seed=3)
    assert batches == length_grouped_batches(lengths, 4, seed=3)
    assert batches != length_grouped_batches(lengths, 4, seed=4)
    assert sorted(i for batch in batches for i in batch) == list(range(500))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 5  # random batches of 4 would spread ~50


def test_packed_logits_equal_unpacked_logits(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(5, 500, (n,), generator=gen).tolist() for n in (9, 5, 12, 3)]
    examples = [_example(s) for s in seqs]
    rows = [[examples[i] for i in row] for row in plan_packs([len(e) for e in examples], 16)]
    batch = collate_packed(rows, pad_token_id=2)
    with torch.no_grad():
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
        packed = model(**inputs).logits
        for b, row in enumerate(rows):
            start = 0
            for example in row:
                alone = model(input_ids=torch.tensor([example.input_ids])).logits[0]
                end = start + len(example)
                torch.testing.assert_close(packed[b, start:end], alone, atol=1e-5, rtol=0)
                start = end


def test_padding_free_row_under_flex_attention_equals_unpacked(tiny_model_dir: Path) -> None:
    # The CUDA path without flash-attn: one row, no dense mask, flex attention with a document mask.
    # Forward only: flex attention has no backward pass on CPU, and its CUDA training was never run.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    gen = torch.Generator().manual_seed(1)
    examples = [_example(torch.randint(5, 500, (n,), generator=gen).tolist()) for n in (9, 5, 12, 3)]
    batch = collate_flat(examples, pad_token_id=2)
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, 29)
    assert batch["seq_lengths"].tolist() == [9, 5, 12, 3]
    use_attention(model, "flex_attention")
    with torch.no_grad():
        flat = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     attention_mask=document_mask(batch["seq_lengths"], torch.device("cpu"))).logits[0]
        use_attention(model, "sdpa")
        start = 0
        for example in examples:
            alone = model(input_ids=torch.tensor([example.input_ids])).logits[0]
            torch.testing.assert_close(flat[start:start + len(example)], alone, atol=1e-5, rtol=0)
            start += len(example)
    # Labels never cross from one example into the next.
    ends = torch.cumsum(batch["seq_lengths"], 0) - 1
    assert (batch["labels"][0, ends] == IGNORE_INDEX).all()
