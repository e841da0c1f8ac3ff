from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from trainer_core.errors import TrainingDataError
from trainer_core.losses.sad import DenseTeacher, SparseTeacher
from trainer_core.spans import TokenizedTrajectory
from trainer_core.teachers import (
    LocalTeacher,
    SGLangTeacher,
    check_same_vocabulary,
    stored_teacher,
)
from trainer_core.tiny import build_tiny_teacher

K = 4
TEXTS = ["Thought: I need to add 3 and 4.\nAction: calculator[3+4]", "Answer: 7"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _right_padded(tokenizer: PreTrainedTokenizerBase) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def _dense_alone(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].log_softmax(dim=-1)


def test_local_top_k_matches_a_dense_forward_per_sequence(
    tiny_teacher_dir: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    input_ids, mask = _right_padded(tokenizer)
    sparse = LocalTeacher(tiny_teacher_dir, top_k=K).distributions(input_ids, mask)
    dense = LocalTeacher(tiny_teacher_dir, top_k=None).distributions(input_ids, mask)
    assert isinstance(sparse.teacher, SparseTeacher) and isinstance(dense.teacher, DenseTeacher)
    assert torch.equal(sparse.available, mask.bool())
    reference = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    for row in range(len(TEXTS)):
        length = int(mask[row].sum())
        alone = _dense_alone(reference, input_ids[row, :length].tolist())
        top = alone.topk(K, dim=-1)
        torch.testing.assert_close(sparse.teacher.logprobs[row, :length], top.values, atol=1e-5, rtol=0)
        assert torch.equal(sparse.teacher.token_ids[row, :length], top.indices)
        dense_logp = dense.teacher.logits[row, :length].log_softmax(-1)
        torch.testing.assert_close(dense_logp, alone, atol=1e-5, rtol=0)


def test_local_teacher_loads_an_adapter_folder_over_its_base(
    tiny_teacher_dir: Path, tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    input_ids, mask = _right_padded(tokenizer)
    got = LocalTeacher(tmp_path / "adapter", top_k=None).distributions(input_ids, mask)
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=input_ids, attention_mask=mask).logits
    torch.testing.assert_close(got.teacher.logits, expected, atol=1e-5, rtol=0)


def test_different_tokenizer_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    other = build_tiny_teacher(tmp_path / "other", vocab_size=300, hidden_size=32, num_layers=1)
    teacher = LocalTeacher(other, top_k=K)
    with pytest.raises(TrainingDataError, match="different tokenizer"):
        teacher.check_vocabulary(AutoTokenizer.from_pretrained(tiny_model_dir))
    check_same_vocabulary(teacher.tokenizer, AutoTokenizer.from_pretrained(other), "same")


def _sglang_handler(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, requests: list[dict], text_of: object = None
) -> httpx.MockTransport:
    """An SGLang /generate stand-in answering in the documented shape from a local model's forward."""

    def handle(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/generate"
        body = json.loads(request.content)
        requests.append(body)
        decode = text_of or (lambda token_id: tokenizer.decode([token_id]))
        results = []
        for ids in body["input_ids"]:
            logp = _dense_alone(model, ids)
            top = logp.topk(body["top_logprobs_num"], dim=-1)
            with_text = body["return_text_in_logprobs"]
            # Entry i scores input token i; nothing precedes token 0, so entry 0 is null.
            input_top = [None] + [
                [[v, i, decode(i) if with_text else None] for v, i in zip(vals, idx, strict=True)]
                for vals, idx in zip(top.values[:-1].tolist(), top.indices[:-1].tolist(), strict=True)
            ]
            input_tokens = [[None, ids[0], decode(ids[0]) if with_text else None]] + [
                [logp[t - 1, ids[t]].item(), ids[t], decode(ids[t]) if with_text else None]
                for t in range(1, len(ids))
            ]
            meta = {"input_top_logprobs": input_top, "input_token_logprobs": input_tokens}
            results.append({"text": "", "meta_info": meta})
        return httpx.Response(200, json=results)

    return httpx.MockTransport(handle)


def test_sglang_top_k_maps_entry_t_plus_1_to_position_t(
    tiny_teacher_dir: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    requests: list[dict] = []
    client = httpx.Client(transport=_sglang_handler(model, tokenizer, requests), base_url="http://teacher")
    teacher = SGLangTeacher("http://teacher/", top_k=K, client=client)
    input_ids, mask = _right_padded(tokenizer)
    got = teacher.distributions(input_ids, mask)
    local = LocalTeacher(tiny_teacher_dir, top_k=K).distributions(input_ids, mask)

    body = requests[0]
    assert body["sampling_params"] == {"max_new_tokens": 0}
    assert body["return_logprob"] is True and body["logprob_start_len"] == 0 and body["top_logprobs_num"] == K
    assert body["input_ids"][1] == input_ids[1, : int(mask[1].sum())].tolist()  # padding is not sent
    lengths = mask.sum(dim=-1)
    for row in range(len(TEXTS)):
        scored = int(lengths[row]) - 1  # the last real token predicts nothing in the input
        assert got.available[row].tolist() == [True] * scored + [False] * (mask.shape[1] - scored)
        torch.testing.assert_close(
            got.teacher.logprobs[row, :scored], local.teacher.logprobs[row, :scored], atol=1e-5, rtol=0
        )
        assert torch.equal(got.teacher.token_ids[row, :scored], local.teacher.token_ids[row, :scored])


def test_sglang_vocabulary_probe(tiny_teacher_dir: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    same = _sglang_handler(model, tokenizer, [])
    SGLangTeacher("http://t", K, client=httpx.Client(transport=same)).check_vocabulary(tokenizer)
    shifted = _sglang_handler(model, tokenizer, [], text_of=lambda token_id: tokenizer.decode([token_id + 1]))
    with pytest.raises(TrainingDataError, match="different tokenizer"):
        SGLangTeacher("http://t", K, client=httpx.Client(transport=shifted)).check_vocabulary(tokenizer)


def test_stored_top_k_lands_one_position_before_the_token_it_predicts() -> None:
    rows = [[12, 5, 6], [13, 7, 8], [14, 1, 2]]
    logprobs = [[-0.1, -3.0, -4.0], [-4.0, -0.2, -3.0], [-0.3, -2.0, -5.0]]
    with_rows = TokenizedTrajectory([9, 10, 11, 12, 13, 14], [0] * 6, 2, rows, logprobs, teacher_start=3)
    without = TokenizedTrajectory([9, 10, 11], [0] * 3, 1)
    batch = stored_teacher([with_rows, without], width=6, vocab_size=100)
    assert batch is not None and isinstance(batch.teacher, SparseTeacher)
    # Row i predicts token teacher_start + i, so it sits on position teacher_start + i - 1.
    assert batch.available[0].tolist() == [False, False, True, True, True, False]
    assert not batch.available[1].any()
    assert batch.teacher.token_ids[0, 2].tolist() == [12, 5, 6]
    assert batch.teacher.token_ids[0, 3].tolist() == [7, 8, 13]  # each row sorted by log-prob
    assert batch.teacher.logprobs[0, 4].tolist() == pytest.approx([-0.3, -2.0, -5.0])
    with pytest.raises(TrainingDataError, match="outside"):
        stored_teacher([with_rows], width=6, vocab_size=14)
    assert stored_teacher([without], width=3, vocab_size=100) is None
