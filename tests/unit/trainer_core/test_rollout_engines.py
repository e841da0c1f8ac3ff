"""Rollout engines: what each returns, the truncated importance weights, and SGLang's HTTP contract.

The paged engine (transformers continuous batching) runs on CPU here too, so its log-probs are
checked against the policy's own; the SGLang engine is checked against a fake server answering in
SGLang v0.5.4's shapes (no SGLang here: it never ran against a real server).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from trainer_core.config import GRPOStage, LoraAdapter, RolloutSpec, RunSpec
from trainer_core.errors import TrainingDataError
from trainer_core.generation import completion_forward, seeded_generator
from trainer_core.losses.common import truncated_importance_weights
from trainer_core.losses.grpo import grpo_loss
from trainer_core.modeling import load_policy
from trainer_core.rollout_engines import (
    LocalEngine,
    PagedEngine,
    SGLangEngine,
    build_engine,
    completions_from_tokens,
)

CPU = torch.device("cpu")
PROMPTS = [[1, 20, 21, 22], [1, 30, 31]]


def _sample(engine: Any, model: Any, seed: int, **kw: Any):
    return engine.sample(model, PROMPTS, version=0, max_new_tokens=kw.get("max_new_tokens", 4),
                         eos_token_ids=[4], pad_token_id=2, generator=seeded_generator(seed, 0),
                         temperature=kw.get("temperature", 1.0), top_p=1.0)


def test_truncated_importance_weights_by_hand() -> None:
    trainer = torch.tensor([[-1.0, -2.0, -0.5]])
    engine = torch.tensor([[-2.0, -2.0, -0.1]])
    mask = torch.tensor([[True, True, False]])
    weights, metrics = truncated_importance_weights(trainer, engine, mask, cap=2.0)
    # e^1 = 2.718 is capped at 2; equal log-probs weigh 1; masked tokens 0.
    torch.testing.assert_close(weights, torch.tensor([[2.0, 1.0, 0.0]]))
    assert float(metrics["rollout/is_truncated"]) == 0.5
    assert float(metrics["rollout/logp_gap"]) == pytest.approx(0.5)


def test_grpo_loss_scales_each_token_by_its_importance_weight() -> None:
    logps = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    advantages = torch.tensor([1.0])
    plain, _ = grpo_loss(logps, logps.detach(), None, advantages, mask)
    same, _ = grpo_loss(logps, logps.detach(), None, advantages, mask, is_weights=torch.ones(1, 2))
    half, _ = grpo_loss(logps, logps.detach(), None, advantages, mask, is_weights=torch.tensor([[0.5, 0.0]]))
    assert float(plain) == float(same) == -1.0  # -ratio * A averaged over the sequence
    assert float(half) == pytest.approx(-0.25)


def test_engine_outputs_become_completions_ending_at_the_first_eos() -> None:
    out = completions_from_tokens([[1, 5], [1]], [[7, 4, 9], [8, 8, 8]], [[-0.1, -0.2, -0.3], [-1, -1, -1]],
                                  eos_token_ids=[4], pad_token_id=0, max_new_tokens=3, device=CPU)
    assert out.completion_ids.tolist() == [[7, 4, 0], [8, 8, 8]]
    assert out.completion_mask.tolist() == [[True, True, False], [True, True, True]]
    torch.testing.assert_close(out.logps, torch.tensor([[-0.1, -0.2, 0.0], [-1.0, -1.0, -1.0]]))
    assert out.truncated.tolist() == [False, True]
    assert out.prompt_ids.tolist() == [[1, 5], [0, 1]]


def test_paged_engine_samples_with_the_policys_own_log_probs(tiny_model_dir: Path) -> None:
    torch.manual_seed(0)
    model = load_policy(tiny_model_dir, LoraAdapter(r=4, target_modules=["q_proj", "v_proj"]), CPU)
    implementation = model.get_base_model().config._attn_implementation
    paged = _sample(PagedEngine(), model, seed=5, temperature=0.8)
    again = _sample(PagedEngine(), model, seed=5, temperature=0.8)
    assert torch.equal(paged.completion_ids, again.completion_ids)  # seeded: resume samples the same
    assert paged.completion_mask.any(dim=1).all()
    with torch.no_grad():
        policy = completion_forward(model.eval(), paged.prompt_ids, paged.prompt_mask, paged.completion_ids,
                                    paged.completion_mask, temperature=0.8)
    mask = paged.completion_mask
    torch.testing.assert_close(policy.logps[mask], paged.logps[mask], atol=1e-4, rtol=1e-4)
    weights, _ = truncated_importance_weights(policy.logps, paged.logps, mask, cap=2.0)
    assert (weights[mask] - 1).abs().max() < 1e-3
    # The training model is left as it was: same attention, and it still trains.
    assert model.get_base_model().config._attn_implementation == implementation
    local = _sample(LocalEngine(), model, seed=5, temperature=0.8)
    assert local.completion_ids.shape[0] == paged.completion_ids.shape[0]


class FakeSGLang:
    """Answers /load_lora_adapter, /unload_lora_adapter and /generate in SGLang v0.5.4's shapes."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.requests.append((request.url.path, body))
        if request.url.path in ("/load_lora_adapter", "/unload_lora_adapter"):
            return httpx.Response(200, json={"success": True, "loaded_adapters": {}})
        replies = []
        for ids in body["input_ids"]:
            out = [ids[-1] + 1, 4]
            replies.append({"text": "x", "output_ids": out, "meta_info": {
                "output_token_logprobs": [[-0.5, out[0], "a"], [-0.25, 4, "b"]],
                "finish_reason": {"type": "stop", "matched": 4}}})
        return httpx.Response(200, json=replies)


def test_sglang_engine_reloads_the_adapter_per_version_and_reads_logprobs(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    fake = FakeSGLang()
    engine = SGLangEngine("http://sglang:30000", tmp_path / "adapters", "policy-run",
                          transport=httpx.MockTransport(fake))
    torch.manual_seed(0)
    model = load_policy(tiny_model_dir, LoraAdapter(r=4, target_modules=["q_proj"]), CPU)
    kw = {"max_new_tokens": 4, "eos_token_ids": [4], "pad_token_id": 2, "temperature": 1.0, "top_p": 1.0}
    first = engine.sample(model, PROMPTS, version=0, generator=seeded_generator(1), **kw)
    engine.sample(model, PROMPTS, version=0, generator=seeded_generator(2), **kw)
    engine.sample(model, PROMPTS, version=1, generator=seeded_generator(3), **kw)
    paths = [p for p, _ in fake.requests]
    assert paths == ["/load_lora_adapter", "/generate", "/generate", "/load_lora_adapter",
                     "/unload_lora_adapter", "/generate"]
    loads = [b for p, b in fake.requests if p == "/load_lora_adapter"]
    assert [b["lora_name"] for b in loads] == ["policy-run-v0", "policy-run-v1"]
    assert fake.requests[4][1] == {"lora_name": "policy-run-v0"}
    assert (Path(loads[1]["lora_path"]) / "adapter_config.json").exists()
    assert not Path(loads[0]["lora_path"]).exists()  # the unloaded version's folder is removed
    generate = fake.requests[1][1]
    assert generate["input_ids"] == PROMPTS and generate["return_logprob"] is True
    assert generate["lora_path"] == ["policy-run-v0"] * 2
    assert generate["sampling_params"]["stop_token_ids"] == [4]
    assert first.completion_ids.tolist() == [[23, 4], [32, 4]]
    torch.testing.assert_close(first.logps, torch.tensor([[-0.5, -0.25]] * 2))
    assert math.isclose(float(first.logps.sum()), -1.5)


def test_sglang_rollouts_need_a_server_and_an_adapter(tmp_path: Path) -> None:
    with pytest.raises(TrainingDataError, match="TUNEYARD_ROLLOUT_SGLANG_URL"):
        build_engine(RolloutSpec(engine="sglang"), sglang_url=None, work_dir=tmp_path, name_prefix="p")
    stage = {"method": "grpo", "datasets": [{"id": "d"}], "batch_size": 4, "num_generations": 2,
             "rollout": {"engine": "sglang"}}
    with pytest.raises(ValueError, match="full fine-tuning has none"):
        RunSpec.model_validate({"base_model": "m", "adapter": {"type": "full"}, "stages": [stage],
                                "export": ["merged"]})
    assert GRPOStage.model_validate(stage).rollout.tis_cap == 2.0
