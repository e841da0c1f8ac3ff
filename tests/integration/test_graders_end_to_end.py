"""RL graders through the API on the real stack: a GRPO run judged by Tuneyard's own
/v1/chat/completions (score_model), and a reward-model run followed by a PPO run it scores."""

from __future__ import annotations

from typing import Any

import httpx

from tests.integration.conftest import PREFERENCE_RECORDS, Stack, events, upload, wait_status

PROMPTS = [{"prompt": f"Name the number {i}.", "answer": str(i)} for i in range(16)]
ADAPTER = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0}


def _metric_names(client: httpx.Client, run_id: str) -> set[str]:
    body = client.get(f"/v1/runs/{run_id}/metrics", params={"stage": 0, "split": "train"}).json()
    return {series["name"] for series in body["data"]}


def _metric(client: httpx.Client, run_id: str, name: str) -> list[float]:
    body = client.get(f"/v1/runs/{run_id}/metrics", params={"stage": 0, "split": "train", "names": name,
                                                           "max_points": 1000}).json()
    return [point[1] for point in body["data"][0]["points"]] if body["data"] else []


def _run(client: httpx.Client, spec: dict[str, Any], timeout: float = 420) -> dict[str, Any]:
    response = client.post("/v1/runs", json=spec)
    assert response.status_code == 201, response.text
    run = wait_status(client, response.json()["id"], {"succeeded", "failed", "cancelled"}, timeout=timeout)
    assert run["status"] == "succeeded", [e["message"] for e in events(client, run["id"])]
    return run


def test_grpo_judged_by_tuneyards_own_inference_endpoint(stack: Stack) -> None:
    # The worker reaches the API like any OpenAI-compatible judge: base_url + a key from its environment.
    stack.start_worker(JUDGE_KEY=stack.key)
    client = stack.client()
    prompts_id = upload(client, PROMPTS, "prompts")
    judge = {"type": "score_model", "name": "judge", "model": "tiny-llama",
             "base_url": f"{stack.base_url}/v1", "api_key_env": "JUDGE_KEY", "range": [0, 10],
             "input": [{"role": "system", "content": "Rate the answer from 0 to 10. Reply with the number."},
                       {"role": "user", "content": "Q: {{item.prompt}}\nA: {{sample.output_text}}"}],
             "sampling_params": {"temperature": 0, "max_completions_tokens": 4}, "max_concurrency": 4}
    reward = {"type": "multi", "name": "total", "calculate_output": "0.5 * exact + 0.05 * judge",
              "graders": {"exact": {"type": "string_check", "reference": "{{item.answer}}",
                                    "operation": "like"},
                          "judge": judge}}
    spec = {"name": "grpo-judge", "base_model": "tiny-llama", "seed": 3, "adapter": ADAPTER,
            "stages": [{"method": "grpo", "datasets": [{"id": prompts_id}], "max_steps": 2, "batch_size": 4,
                        "num_generations": 2, "max_new_tokens": 4, "max_seq_len": 64,
                        "learning_rate": 1e-3, "reward": reward}],
            "checkpoint_every_steps": 2, "export": ["adapter"]}
    run = _run(client, spec)
    names = _metric_names(client, run["id"])
    assert {"rewards/judge", "rewards/judge/errors", "rewards/exact", "rewards/total"} <= names
    # Every sample was judged: a reply without a number counts as an error, an unreachable judge
    # would have failed the run (see below), so the two together account for the samples.
    assert all(0 <= value <= 10 for value in _metric(client, run["id"], "rewards/judge"))

    down = {**judge, "base_url": "http://127.0.0.1:9/v1", "max_retries": 1}
    failing = client.post("/v1/runs", json={**spec, "name": "grpo-judge-down",
                                            "stages": [{**spec["stages"][0], "reward": down}]})
    assert failing.status_code == 201
    ended = wait_status(client, failing.json()["id"], {"succeeded", "failed"}, timeout=300)
    assert ended["status"] == "failed"
    error = next(e for e in events(client, ended["id"]) if e["kind"] == "error")
    assert error["data"]["code"] == "grader_error" and "failed after 2 attempts" in error["message"]


def test_reward_model_run_then_ppo_scored_by_it(stack: Stack) -> None:
    stack.start_worker()
    client = stack.client()
    pref_id = upload(client, PREFERENCE_RECORDS, "preference")
    rm_run = _run(client, {
        "name": "rm", "base_model": "tiny-llama", "seed": 5, "adapter": ADAPTER,
        "stages": [{"method": "reward_model", "datasets": [{"id": pref_id}], "max_steps": 6, "batch_size": 8,
                    "max_seq_len": 64, "learning_rate": 5e-3, "eval_fraction": 0.25, "eval_every_steps": 6}],
        "checkpoint_every_steps": 6})
    listed = client.get(f"/v1/runs/{rm_run['id']}/checkpoints").json()["data"]
    rm = next(c for c in listed if c["kind"] == "reward_model")
    assert "eval_accuracy" in _metric_names(client, rm_run["id"]) or rm["metrics"] is not None

    # The grader can be tried on one sample first.
    tried = client.post("/v1/graders/run", json={
        "grader": {"type": "reward_model", "model": rm["id"]}, "model_sample": " 3.",
        "item": {"prompt": "Name the number 3."}}, timeout=180)  # the API loads torch and the model
    assert tried.status_code == 200, tried.text
    assert isinstance(tried.json()["reward"], float)

    prompts_id = upload(client, PROMPTS, "prompts")
    unknown = client.post("/v1/runs", json={
        "base_model": "tiny-llama", "stages": [{"method": "ppo", "datasets": [{"id": prompts_id}],
                                                "reward": {"type": "reward_model", "model": "ckpt_nope"}}]})
    assert unknown.status_code == 422 and unknown.json()["error"]["param"] == "stages[0].reward.model"
    ppo_run = _run(client, {
        "name": "ppo-rm", "base_model": "tiny-llama", "seed": 5, "adapter": ADAPTER,
        "stages": [{"method": "ppo", "datasets": [{"id": prompts_id}], "max_steps": 2, "batch_size": 4,
                    "ppo_epochs": 1, "max_new_tokens": 4, "max_seq_len": 64, "learning_rate": 1e-3,
                    "reward": {"type": "reward_model", "name": "rm", "model": rm["id"]}}],
        "checkpoint_every_steps": 2})
    assert {"rewards/rm", "rewards/rm/errors", "objective/scores"} <= _metric_names(client, ppo_run["id"])
    assert _metric(client, ppo_run["id"], "rewards/rm/errors") == [0.0, 0.0]
