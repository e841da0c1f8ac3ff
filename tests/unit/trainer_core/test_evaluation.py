from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from trainer_core.config import SamplingParams
from trainer_core.data.render import render_prompt, render_sft
from trainer_core.decoding import decode
from trainer_core.eval_metrics import check_metrics, metric_formats
from trainer_core.evaluation import evaluate, prompt_and_answer
from trainer_core.losses import sft_loss
from trainer_core.modeling import load_tokenizer

SFT = [
    {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello there"}]},
    {"prompt": "1+2=", "completion": "3"},
    {
        "messages": [
            {"role": "user", "content": "thanks a lot"},
            {"role": "assistant", "content": "you are welcome"},
        ]
    },
]


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return load_tokenizer(tiny_model_dir)


def test_loss_is_the_token_weighted_cross_entropy_of_trained_tokens(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    result = evaluate(model, tokenizer, SFT, "sft", ["loss", "perplexity"], batch_size=2)
    total, count = 0.0, 0
    for record in SFT:
        example = render_sft(tokenizer, record, 2048, "left")
        ids = torch.tensor([example.input_ids])
        labels = torch.tensor([example.labels])
        with torch.no_grad():
            logits = model(ids).logits[:, :-1]
        loss, metrics = sft_loss(logits, labels[:, 1:])
        total += float(loss) * int(metrics["num_tokens"])
        count += int(metrics["num_tokens"])
    assert result.metrics["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result.metrics["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result.num_examples == 3 and result.samples == []


def test_preference_accuracy_flips_when_chosen_and_rejected_swap(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    pairs = [
        {"prompt": "1+1=", "chosen": "2", "rejected": "the answer is three"},
        {"prompt": "hi", "chosen": "hello there friend", "rejected": "no"},
        {
            "messages": [{"role": "user", "content": "city?"}],
            "chosen": [{"role": "assistant", "content": "search"}],
            "rejected": [{"role": "assistant", "content": "weather city file"}],
        },
        {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
    ]
    swapped = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs]
    accuracy = evaluate(model, tokenizer, pairs, "preference", ["preference_accuracy", "loss"]).metrics
    flipped = evaluate(model, tokenizer, swapped, "preference", ["preference_accuracy"]).metrics
    assert accuracy["preference_accuracy"] + flipped["preference_accuracy"] == pytest.approx(1.0)
    assert accuracy["loss"] > 0


def test_exact_match_scores_greedy_generations_against_the_answer(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    greedy = decode(
        model,
        tokenizer,
        render_prompt(tokenizer, {"prompt": "2+2="}),
        SamplingParams(max_tokens=4, temperature=0),
        eos_token_ids=[tokenizer.eos_token_id],
    ).text
    records = [
        {"prompt": "2+2=", "answer": greedy, "difficulty": None},
        {"prompt": "2+2=", "answer": greedy + " not this", "difficulty": None},
    ]
    result = evaluate(
        model,
        tokenizer,
        records,
        "prompts",
        ["exact_match", "contains"],
        generation=SamplingParams(max_tokens=4, temperature=0, seed=0),
        num_samples=1,
    )
    assert result.metrics["exact_match"] == pytest.approx(0.5)
    assert len(result.samples) == 1
    assert result.samples[0]["completion"] == greedy and result.samples[0]["scores"]["exact_match"] == 1.0


def test_progress_reaches_one(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    seen: list[float] = []
    evaluate(
        model,
        tokenizer,
        SFT,
        "sft",
        ["loss", "exact_match"],
        generation=SamplingParams(max_tokens=2, temperature=0, seed=0),
        on_progress=seen.append,
    )
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0)


def test_sft_records_give_their_last_assistant_turn_or_completion_as_the_answer() -> None:
    assert prompt_and_answer(SFT[0]) == ({"messages": [{"role": "user", "content": "hello"}]}, "hello there")
    assert prompt_and_answer(SFT[1]) == ({"prompt": "1+2="}, "3")
    assert prompt_and_answer({"text": "just text"}) is None


def test_metrics_are_checked_against_the_dataset_format() -> None:
    check_metrics(["loss", "exact_match"], "sft")
    assert metric_formats("preference_accuracy") == ("preference",)
    with pytest.raises(ValueError, match="needs preference records"):
        check_metrics(["preference_accuracy"], "sft")
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        check_metrics(["bleu"], "sft")
    with pytest.raises(ValueError, match="needs parameters \\(pattern\\)"):
        check_metrics(["regex"], "prompts")
