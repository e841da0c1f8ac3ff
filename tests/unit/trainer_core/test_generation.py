from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from trainer_core.generation import (
    Completions,
    completion_forward,
    left_pad,
    sample_completions,
    seeded_generator,
)

PROMPTS = [[1, 40, 41, 42, 43], [1, 50], [1, 60, 61]]
PAD = 2


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def _sample(model: PreTrainedModel, seed: int, **kwargs: object) -> Completions:
    options: dict = {"max_new_tokens": 12, "eos_token_ids": [4], "pad_token_id": PAD} | kwargs
    return sample_completions(model, PROMPTS, generator=seeded_generator(seed, 3), **options)


def test_left_pad_aligns_prompts_right() -> None:
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]


def test_same_seed_same_completions_other_seed_differs(model: PreTrainedModel) -> None:
    first, again, other = _sample(model, 0), _sample(model, 0), _sample(model, 1)
    assert torch.equal(first.completion_ids, again.completion_ids)
    assert torch.equal(first.logps, again.logps)
    assert not torch.equal(first.completion_ids, other.completion_ids)


def test_sampler_logps_match_a_full_forward_with_left_padding(model: PreTrainedModel) -> None:
    out = _sample(model, 0, temperature=0.7)
    with torch.no_grad():
        full = completion_forward(
            model, out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask, temperature=0.7
        )
    torch.testing.assert_close(full.logps, out.logps, atol=1e-5, rtol=1e-5)
    # A padded prompt must decode as if it were alone.
    alone = sample_completions(
        model, [PROMPTS[1]], max_new_tokens=4, eos_token_ids=[4], pad_token_id=PAD,
        generator=seeded_generator(0, 0), temperature=1e-4,
    )
    batched = sample_completions(
        model, PROMPTS, max_new_tokens=4, eos_token_ids=[4], pad_token_id=PAD,
        generator=seeded_generator(0, 0), temperature=1e-4,
    )
    assert batched.completion_ids[1].tolist() == alone.completion_ids[0].tolist()


def test_rows_stop_at_their_first_eos_and_pad_afterwards(model: PreTrainedModel) -> None:
    vocab = model.config.vocab_size
    eos = list(range(0, vocab, 5))  # a fifth of the vocabulary ends a row: rows stop at different times
    out = _sample(model, 0, eos_token_ids=eos, max_new_tokens=10)
    for ids, mask, truncated in zip(out.completion_ids, out.completion_mask, out.truncated, strict=True):
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()
        assert all(t not in eos for t in ids[: length - 1].tolist())
        assert (ids[length - 1].item() in eos) != bool(truncated)
        assert (ids[length:] == PAD).all()
    assert out.logps[~out.completion_mask].abs().sum() == 0
    assert len(set(out.lengths.tolist())) > 1 and out.truncated.any()


def test_tiny_top_p_is_greedy_and_eval_mode_is_restored(model: PreTrainedModel) -> None:
    model.train()
    out = _sample(model, 0, top_p=1e-6, max_new_tokens=5)
    assert model.training
    ids = torch.cat([out.prompt_ids, out.completion_ids], dim=1)
    attention = torch.cat([out.prompt_mask, out.completion_mask], dim=1)
    positions = (attention.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model.eval()(input_ids=ids, attention_mask=attention.long(), position_ids=positions).logits
    prompt_len = out.prompt_ids.shape[1]
    greedy = logits[:, prompt_len - 1 : prompt_len - 1 + out.completion_ids.shape[1]].argmax(dim=-1)
    assert torch.equal(greedy[out.completion_mask], out.completion_ids[out.completion_mask])


def test_completion_forward_returns_hidden_states_for_completion_positions(model: PreTrainedModel) -> None:
    out = _sample(model, 0, max_new_tokens=3)
    with torch.no_grad():
        full = completion_forward(
            model, out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask, with_hidden=True
        )
    assert full.hidden is not None
    assert full.hidden.shape == (*out.completion_ids.shape, model.config.hidden_size)
    assert full.logps.shape == out.completion_ids.shape and full.entropy is None
