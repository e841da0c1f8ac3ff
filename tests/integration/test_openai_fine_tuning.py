"""The unmodified `openai` SDK trains here: files → jobs → events → checkpoints → chat completions,
on PostgreSQL + Redis with real worker and reaper processes, and webhooks that reach a receiver
on 127.0.0.1 verified by `client.webhooks.unwrap` — also across SIGKILLs of worker and deliverer."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from openai import ConflictError, OpenAI

from tests.integration.conftest import Stack, wait_for

CHAT = [{"messages": [{"role": "system", "content": "You add."},
                      {"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(16)]
PREFS = [{"input": {"messages": [{"role": "user", "content": f"Name the number {i}."}]},
          "preferred_output": [{"role": "assistant", "content": f"{i}."}],
          "non_preferred_output": [{"role": "assistant", "content": f"Not {i}, no."}]} for i in range(8)]
ENDED = {"succeeded", "failed", "cancelled"}


# On a loaded shared machine a 3 s lease expires while a worker loads the model; these tests are
# about the OpenAI face, not lease recovery (tests/integration/test_leases.py is).
# The receiver verifies with the SDK inside its handler; 2 s to answer is tight on such a machine.
STACK_ENV = {"TUNEYARD_LEASE_SECONDS": "20", "TUNEYARD_WEBHOOK_TIMEOUT_SECONDS": "15"}


def jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def sdk(stack: Stack) -> OpenAI:
    return OpenAI(api_key=stack.key, base_url=f"{stack.base_url}/v1", max_retries=0, timeout=120)


def follow_events(client: OpenAI, job_id: str, until: set[str], timeout: float = 240) -> list[Any]:
    """Returns every event of the job (oldest first) once its status is in `until`, reading new
    events page by page with the SDK as a client following a job would."""
    seen: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while True:
        for event in client.fine_tuning.jobs.list_events(job_id, limit=100):
            if event.id in seen:
                break  # newest first: everything older was read before
            seen[event.id] = event
        if client.fine_tuning.jobs.retrieve(job_id).status in until:
            for event in client.fine_tuning.jobs.list_events(job_id, limit=100):
                seen.setdefault(event.id, event)
            return sorted(seen.values(), key=lambda e: (e.created_at, e.id))
        assert time.monotonic() < deadline, f"job {job_id} did not reach {until}"
        time.sleep(0.3)


@dataclass
class Receiver:
    """An HTTP receiver that verifies each delivery with the SDK and answers 500 to the first `fail` ones."""

    fail: int
    secret: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""
    sdk: OpenAI = field(default_factory=lambda: OpenAI(api_key="unused"))

    def handle(self, body: bytes, headers: dict[str, str]) -> int:
        event = self.sdk.webhooks.unwrap(body, headers, secret=self.secret)
        self.requests.append({"id": headers["webhook-id"], "type": event.type, "data": event.data.id})
        return 500 if len(self.requests) <= self.fail else 200

    def unique(self, event_type: str) -> set[tuple[str, str]]:
        """Returns the (webhook-id, object id) pairs of one type after de-duplication by webhook-id."""
        return {(r["id"], r["data"]) for r in self.requests if r["type"] == event_type}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(fail=2)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers["Content-Length"]))
            try:
                code = state.handle(body, {k.lower(): v for k, v in self.headers.items()})
            except Exception:  # a bad signature answers 400 and is not counted
                code = 400
            self.send_response(code)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()


def subscribe(client: OpenAI, receiver: Receiver) -> str:
    endpoint = client.webhooks.create(url=receiver.url, name="ci", event_types=["fine_tuning.job.succeeded"])
    receiver.secret = endpoint.signing_secret
    return endpoint.id


def deliveries(stack: Stack, endpoint_id: str) -> list[dict[str, Any]]:
    return stack.client().get(f"/v1/webhook_endpoints/{endpoint_id}/deliveries").json()["data"]


def test_supervised_job_with_the_openai_sdk(stack: Stack, receiver: Receiver) -> None:
    stack.start_worker()
    client = sdk(stack)
    endpoint_id = subscribe(client, receiver)
    training = client.files.create(file=("adder.jsonl", jsonl(CHAT)), purpose="fine-tune")
    assert training.object == "file" and training.purpose == "fine-tune"
    job = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=training.id, suffix="adder", seed=3,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 5}}})
    assert job.status in ("validating_files", "queued") and job.fine_tuned_model is None

    events = follow_events(client, job.id, ENDED)
    job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", (job, [e.message for e in events])
    assert job.fine_tuned_model == f"ft:tiny-llama:integration:adder:{job.id}"
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 4
    steps = [e.data["step"] for e in events if e.type == "metrics" and "train_loss" in e.data]
    assert steps == list(range(1, 9))  # 16 examples, 4 per step, 2 epochs
    assert any(e.message == "run succeeded" for e in events)

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [8, 4]  # newest first, one per epoch
    assert all(c.fine_tuning_job_id == job.id and c.metrics.train_loss is not None for c in checkpoints)
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-8"

    # The job's model, and an intermediate checkpoint by its name, answer chat completions.
    for model in (job.fine_tuned_model, checkpoints[1].fine_tuned_model_checkpoint):
        reply = client.chat.completions.create(model=model, max_tokens=4, temperature=0,
                                               messages=[{"role": "user", "content": "What is 3 plus 3?"}])
        assert reply.choices[0].message.content is not None
    listed = {m.id for m in client.models.list()}
    assert {job.fine_tuned_model, checkpoints[1].fine_tuned_model_checkpoint} <= listed

    # The job is the run it is: /v1/runs lists it with its one SFT stage.
    run_id = job.model_extra["run_id"]
    run = stack.client().get(f"/v1/runs/{run_id}").json()
    assert run["name"] == job.id and run["status"] == "succeeded"
    assert [(s["method"], s["status"], s["step"]) for s in run["stages"]] == [("sft", "succeeded", 8)]

    # Webhook: 500, 500, then 200 — three verified requests of one event, one after de-duplication.
    wait_for(lambda: len(receiver.requests) >= 3, 30, "three delivery attempts")
    time.sleep(1.5)  # nothing more comes after the 200
    assert len(receiver.requests) == 3
    assert receiver.unique("fine_tuning.job.succeeded") == {(receiver.requests[0]["id"], job.id)}
    (delivery,) = deliveries(stack, endpoint_id)
    assert delivery["status"] == "delivered" and delivery["event_id"] == receiver.requests[0]["id"]
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 500, 200]
    client.webhooks.delete(endpoint_id)


def test_dpo_job_and_a_webhook_across_sigkills(stack: Stack, receiver: Receiver) -> None:
    client = sdk(stack)
    endpoint_id = subscribe(client, receiver)
    # The deliverer is gone before the job ends, so the event waits in the outbox.
    for process in stack.processes[1:]:
        process.kill()
        process.wait(10)
    del stack.processes[1:]
    stack.stop_workers()
    worker = stack.start_worker()
    training = client.files.create(file=("prefs.jsonl", jsonl(PREFS)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=training.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1, "batch_size": 4, "beta": 0.2}}})
    events = follow_events(client, job.id, ENDED)
    job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", [e.message for e in events]
    worker.kill()  # the worker that ended the job dies before anything was delivered
    assert receiver.requests == []
    assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id)] == [2]
    reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=3,
                                           messages=[{"role": "user", "content": "Name the number 2."}])
    assert reply.choices[0].message.content is not None

    # A fresh deliverer finds the event; killed after the first failed attempt, the next one resumes.
    deliverer = stack.start_reaper()
    wait_for(lambda: receiver.requests, 30, "the first delivery attempt")
    deliverer.kill()
    deliverer.wait(10)
    stack.processes.remove(deliverer)
    stack.start_reaper()
    # A deliverer killed mid-request holds its lock until it runs out (3 × timeout + 5 s).
    wait_for(lambda: len(receiver.requests) >= 3, 120, "delivery after the restart")
    time.sleep(1.5)
    assert len(receiver.requests) == 3
    assert receiver.unique("fine_tuning.job.succeeded") == {(receiver.requests[0]["id"], job.id)}
    (delivery,) = deliveries(stack, endpoint_id)
    assert delivery["status"] == "delivered" and delivery["attempts"][-1]["status_code"] == 200
    client.webhooks.delete(endpoint_id)


def test_pause_resume_cancel_and_a_malformed_file(stack: Stack) -> None:
    stack.stop_workers()
    stack.start_worker()
    client = sdk(stack)
    bad = client.files.create(file=("bad.jsonl", jsonl(CHAT[:2]) + b'{"messages": "hello"}\n'),
                              purpose="fine-tune")
    failed = client.fine_tuning.jobs.create(model="tiny-llama", training_file=bad.id)
    follow_events(client, failed.id, ENDED, timeout=60)
    failed = client.fine_tuning.jobs.retrieve(failed.id)
    assert failed.status == "failed" and failed.error.code == "invalid_training_file"
    assert failed.error.param == "training_file" and "line 3" in failed.error.message

    long = client.files.create(file=("long.jsonl", jsonl(CHAT * 4)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=long.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 5, "batch_size": 1}}})
    runs = stack.client()

    def run() -> dict[str, Any]:
        return runs.get(f"/v1/runs/{client.fine_tuning.jobs.retrieve(job.id).model_extra['run_id']}").json()

    def trained_step() -> int:
        return run()["stages"][0]["step"]

    wait_for(lambda: client.fine_tuning.jobs.retrieve(job.id).status == "running" and trained_step() >= 2,
             120, "the job training")
    assert client.fine_tuning.jobs.pause(job.id).status in ("paused", "running")
    wait_for(lambda: run()["status"] == "cancelled", 60, "the run stopped by the pause")
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"
    paused_at = trained_step()
    assert 2 <= paused_at < 320
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data[0].step_number == paused_at

    assert client.fine_tuning.jobs.resume(job.id).status in ("queued", "running")
    wait_for(lambda: trained_step() > paused_at + 1, 120, "training to continue after the resume")
    assert run()["attempt"] == 2  # the same run, continued from its checkpoint
    client.fine_tuning.jobs.cancel(job.id)
    wait_for(lambda: run()["status"] == "cancelled", 60, "the run stopped by the cancel")
    cancelled = client.fine_tuning.jobs.retrieve(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    with pytest.raises(ConflictError, match="only a paused job"):
        client.fine_tuning.jobs.resume(job.id)


def test_reinforcement_job_with_a_string_check_grader(stack: Stack) -> None:
    if not any(w.process.poll() is None for w in stack.workers):
        stack.start_worker()
    client = sdk(stack)
    prompts = [{"messages": [{"role": "user", "content": f"Say the letter {c}."}], "answer": c}
               for c in "abcdefgh"]
    training = client.files.create(file=("letters.jsonl", jsonl(prompts)), purpose="fine-tune")
    grader = {"type": "string_check", "name": "letter", "input": "{{sample.output_text}}",
              "reference": "{{item.answer}}", "operation": "ilike"}
    job = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=training.id,
        method={"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": {
            "n_epochs": 1, "batch_size": 2, "compute_multiplier": 2, "reasoning_effort": "low"}}})
    events = follow_events(client, job.id, ENDED)
    job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", [e.message for e in events]
    rewards = [e.data["rewards/letter"] for e in events if e.type == "metrics" and "train_loss" in e.data]
    assert len(rewards) == 4 and all(0.0 <= r <= 1.0 for r in rewards)  # 8 prompts, 2 per step
    ignored = [e for e in events if e.level == "warn" and "accepted and ignored" in e.message]
    assert ignored and "compute_multiplier" in ignored[0].message
    run = stack.client().get(f"/v1/runs/{job.model_extra['run_id']}").json()
    stage = run["spec"]["stages"][0]
    assert (stage["method"], stage["reward"]["type"], stage["batch_size"], stage["num_generations"]) == (
        "grpo", "string_check", 8, 4)
    assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id)] == [4]
    reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=3,
                                           messages=[{"role": "user", "content": "Say the letter c."}])
    assert reply.choices[0].message.content is not None
