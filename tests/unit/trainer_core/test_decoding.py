from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from trainer_core.config import SamplingParams, TokenLogprob
from trainer_core.decoding import decode
from trainer_core.modeling import load_tokenizer

NO_EOS: list[int] = []  # random weights: never stop early, so lengths are predictable


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def prompt(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return tokenizer("What is 2+3?")["input_ids"]


def test_greedy_follows_the_argmax_of_full_forwards(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: list[int]
) -> None:
    out = decode(
        model, tokenizer, prompt, SamplingParams(max_tokens=6, temperature=0), eos_token_ids=NO_EOS
    )
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert out.token_ids == ids[len(prompt) :]
    assert out.finish_reason == "length" and out.prompt_tokens == len(prompt)
    assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_seeded_sampling_repeats_and_other_seeds_differ(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: list[int]
) -> None:
    def sample(seed: int) -> list[int]:
        params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=seed)
        return decode(model, tokenizer, prompt, params, eos_token_ids=NO_EOS).token_ids

    assert sample(5) == sample(5)
    assert sample(5) != sample(6)


def test_stop_string_ends_the_text_before_it_and_streaming_adds_up(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: list[int]
) -> None:
    free = decode(
        model, tokenizer, prompt, SamplingParams(max_tokens=12, temperature=0), eos_token_ids=NO_EOS
    )
    stop = free.text[4:6]
    pieces: list[str] = []
    out = decode(
        model,
        tokenizer,
        prompt,
        SamplingParams(max_tokens=12, temperature=0, stop=(stop,)),
        eos_token_ids=NO_EOS,
        on_text=lambda text, _: pieces.append(text),
    )
    assert out.text == free.text[: free.text.index(stop)]
    assert out.finish_reason == "stop"
    assert "".join(pieces) == out.text


def test_streamed_pieces_add_up_to_the_text_without_stop(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: list[int]
) -> None:
    pieces: list[tuple[str, list[TokenLogprob]]] = []
    params = SamplingParams(max_tokens=10, temperature=0, logprobs=True)
    out = decode(
        model, tokenizer, prompt, params, eos_token_ids=NO_EOS, on_text=lambda t, lp: pieces.append((t, lp))
    )
    assert "".join(t for t, _ in pieces) == out.text
    assert [e for _, lps in pieces for e in lps] == out.logprobs


def test_logprobs_describe_each_generated_token(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: list[int]
) -> None:
    params = SamplingParams(max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    out = decode(model, tokenizer, prompt, params, eos_token_ids=NO_EOS)
    assert [e.token for e in out.logprobs] == [tokenizer.decode([t]) for t in out.token_ids]
    for entry in out.logprobs:
        assert entry.logprob <= 0
        assert len(entry.top) == 3
        assert [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)
        assert entry.top[0] == (entry.token, pytest.approx(entry.logprob))  # greedy picks the top token


def test_eos_ends_the_sequence_and_is_left_out(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: list[int]
) -> None:
    first = decode(
        model, tokenizer, prompt, SamplingParams(max_tokens=3, temperature=0), eos_token_ids=NO_EOS
    )
    params = SamplingParams(max_tokens=10, temperature=0, logprobs=True)
    out = decode(model, tokenizer, prompt, params, eos_token_ids=[first.token_ids[2]])
    assert out.finish_reason == "stop"
    assert out.token_ids == first.token_ids[:2] and len(out.logprobs) == 2


def test_should_stop_ends_decoding_early(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: list[int]
) -> None:
    calls = iter(range(100))
    out = decode(
        model,
        tokenizer,
        prompt,
        SamplingParams(max_tokens=50, temperature=0),
        eos_token_ids=NO_EOS,
        should_stop=lambda: next(calls) >= 3,
    )
    assert len(out.token_ids) == 3 and out.finish_reason == "stop"
