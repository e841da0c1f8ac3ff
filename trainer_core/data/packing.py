"""Batches rendered examples: packed rows with block-diagonal attention, or padded length-grouped batches.

Both collates return the same keys (tensors on CPU):

- `input_ids` [B, L] long; padding is `pad_token_id`.
- `labels` [B, L] long, already shifted as `trainer_core.losses` expects: `labels[b, t]` is the
  target for the logits at t, i.e. the next token when that token is trained and belongs to the
  same sequence, else IGNORE_INDEX. So the last token of a packed sequence never predicts the
  first token of the next one, and nothing predicts a sequence's first token.
- `position_ids` [B, L] long, restarting at 0 for each sequence (and for each row's padding).
- `attention_mask`: packed → [B, 1, L, L] float, 0 where a query may attend and −inf
  elsewhere (causal within each sequence, block-diagonal across them); padded → [B, L]
  long (1 real, 0 padding) and the model builds the causal mask. Pass `input_ids`,
  `attention_mask` and `position_ids` to the model. Restarting position_ids alone does NOT keep
  packed sequences apart under sdpa/eager attention (REFERENCE.md "Packing"), hence the 4D mask.
- `seq_lengths` [S] int32 and `cu_seqlens` [S + 1] int32: every segment of the batch flattened
  row-major — each sequence, and each row's trailing padding as a segment of its own — so the
  segments tile all B·L tokens. This is what flash-attention's varlen kernels take
  (`cu_seqlens_q/k`, `max_seqlen`); on GPU, transformers' flash-attention path can instead derive the
  same boundaries from the restarting `position_ids` (padding-free), and the O(L²) 4D mask can be
  dropped there.
- `num_tokens`: int, real (non-padding) tokens in the batch.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence

import torch

from trainer_core.data import IGNORE_INDEX
from trainer_core.data.render import RenderedExample

Batch = dict[str, torch.Tensor | int]


def plan_packs(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Returns rows of example indices, each row's lengths summing to ≤ max_len (best-fit decreasing).

    Deterministic: ties keep the input order. Rows come out in the order they were opened.
    """
    too_long = [i for i, n in enumerate(lengths) if n > max_len]
    if too_long:
        first = too_long[0]
        raise ValueError(f"example {first} has {lengths[first]} tokens, more than max_len {max_len}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, row index), kept sorted
    for i in order:
        # The fullest row that still fits this example: smallest remaining capacity ≥ its length.
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            rows.append([i])
            bisect.insort(free, (max_len - lengths[i], len(rows) - 1))
            continue
        room, row = free.pop(at)
        rows[row].append(i)
        bisect.insort(free, (room - lengths[i], row))
    return rows


def _shifted_labels(example: RenderedExample) -> list[int]:
    ids, mask = example.input_ids, example.loss_mask
    return [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]


def _new_batch(num_rows: int, length: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.full((num_rows, length), pad_token_id, dtype=torch.long),
        "labels": torch.full((num_rows, length), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.zeros((num_rows, length), dtype=torch.long),
    }


def _finish(batch: dict[str, torch.Tensor], segments: list[int], num_tokens: int) -> Batch:
    seq_lengths = torch.tensor(segments, dtype=torch.int32)
    cu_seqlens = torch.zeros(len(segments) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(seq_lengths, 0)
    return {**batch, "seq_lengths": seq_lengths, "cu_seqlens": cu_seqlens, "num_tokens": num_tokens}


def collate_packed(
    rows: Sequence[Sequence[RenderedExample]], pad_token_id: int, *, dtype: torch.dtype = torch.float32,
    pad_to: int | None = None, dense_mask: bool = True,
) -> Batch:
    """Returns one batch with each row's examples packed side by side (keys in the module docstring).

    `dtype` is the attention mask's (use the model's compute dtype); `pad_to` fixes the row length;
    `dense_mask=False` leaves the O(L²) mask out (for varlen attention, see `collate_flat`).
    """
    length = pad_to or max(sum(len(e) for e in row) for row in rows)
    batch = _new_batch(len(rows), length, pad_token_id)
    blocked = torch.ones((len(rows), length, length) if dense_mask else (len(rows), 0, 0), dtype=torch.bool)
    segments: list[int] = []
    num_tokens = 0
    for b, row in enumerate(rows):
        start = 0
        for example in row:
            end = start + len(example)
            batch["input_ids"][b, start:end] = torch.tensor(example.input_ids)
            batch["labels"][b, start:end] = torch.tensor(_shifted_labels(example))
            batch["position_ids"][b, start:end] = torch.arange(len(example))
            segments.append(len(example))
            if dense_mask:
                blocked[b, start:end, start:end] = False
            start = end
        num_tokens += start
        if start < length:
            # Padding is a segment of its own so every query row attends somewhere (no NaN rows).
            batch["position_ids"][b, start:] = torch.arange(length - start)
            if dense_mask:
                blocked[b, start:, start:] = False
            segments.append(length - start)
    if not dense_mask:
        return _finish(batch, segments, num_tokens)
    blocked |= torch.ones((length, length), dtype=torch.bool).triu(1)
    mask = torch.zeros((len(rows), 1, length, length), dtype=dtype)
    mask.masked_fill_(blocked.unsqueeze(1), float("-inf"))
    return _finish({**batch, "attention_mask": mask}, segments, num_tokens)


def collate_flat(examples: Sequence[RenderedExample], pad_token_id: int) -> Batch:
    """Returns one padding-free row [1, T] holding every example end to end, with no attention mask.

    Keys as in the module docstring except `attention_mask` (absent): a varlen attention path
    separates the examples from the restarting `position_ids` (flash-attention) or from a
    document mask built from `seq_lengths` (flex attention). Memory is O(T), not O(T²).
    """
    return collate_packed([list(examples)], pad_token_id, dense_mask=False)


def collate_padded(
    examples: Sequence[RenderedExample], pad_token_id: int, *, pad_to: int | None = None
) -> Batch:
    """Returns one right-padded batch of whole examples, one per row (keys in the module docstring)."""
    length = pad_to or max(len(e) for e in examples)
    batch = _new_batch(len(examples), length, pad_token_id)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    segments: list[int] = []
    for b, example in enumerate(examples):
        n = len(example)
        batch["input_ids"][b, :n] = torch.tensor(example.input_ids)
        batch["labels"][b, :n] = torch.tensor(_shifted_labels(example))
        batch["position_ids"][b, :n] = torch.arange(n)
        batch["position_ids"][b, n:] = torch.arange(length - n)
        attention[b, :n] = 1
        segments += [n, length - n] if n < length else [n]
    return _finish({**batch, "attention_mask": attention}, segments, int(attention.sum()))


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int) -> list[list[int]]:
    """Returns batches of indices whose examples have similar lengths, in a seeded random order.

    Indices are shuffled, cut into groups of 50 batches, each group sorted by length and cut into
    batches, and the batches shuffled: little padding, yet no global short-to-long order.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    group = batch_size * 50
    batches: list[list[int]] = []
    for g in range(0, len(order), group):
        chunk = sorted(order[g : g + group], key=lambda i: -lengths[i])
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
