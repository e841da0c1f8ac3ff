"""The training loop with a toy method: accumulation, schedule, stop + resume, retention."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer_core.checkpoint import complete_checkpoints, read_manifest
from trainer_core.config import LoraAdapter, SFTStage
from trainer_core.loop import CheckpointPolicy, learning_rate_at, train_stage
from trainer_core.losses.sft import sft_loss
from trainer_core.methods.base import LossOutput, MethodDefaults
from trainer_core.modeling import load_policy, trainable_parameters
from trainer_core.reporting import RecordingReporter

CPU = torch.device("cpu")


class ToyMethod(MethodDefaults):
    """Next-token loss on fixed random sequences; batches drawn from a generator seeded by the step."""

    def __init__(self, total_steps: int, micro: int, per_micro: int, seed: int = 0) -> None:
        self.total_steps = total_steps
        self.micro, self.per_micro, self.seed = micro, per_micro, seed
        self.seqs = torch.randint(5, 200, (16, 12), generator=torch.Generator().manual_seed(seed))
        self.evals = 0

    def micro_batches(self, model, step: int) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + step)
        order = torch.randperm(len(self.seqs), generator=generator)
        n = self.per_micro
        return [self.seqs[order[i * n:(i + 1) * n]] for i in range(self.micro)]

    def loss(self, model, batch: torch.Tensor, step: int) -> LossOutput:
        logits = model(input_ids=batch).logits[:, :-1]
        labels = batch[:, 1:]
        loss, metrics = sft_loss(logits, labels, num_tokens_in_batch=1)
        return LossOutput(loss, labels.numel(), batch.numel(), {"acc": metrics["mean_token_accuracy"]})

    def evaluate(self, model) -> dict[str, float]:
        self.evals += 1
        logits = model(input_ids=self.seqs).logits[:, :-1]
        loss, _ = sft_loss(logits, self.seqs[:, 1:])
        return {"eval_loss": float(loss)}

    def state_dict(self) -> dict:
        return {"evals": self.evals}

    def load_state_dict(self, state: dict) -> None:
        self.evals = state["evals"]


class ToyMethodWithScale(ToyMethod):
    """ToyMethod whose logits pass through an extra trainable module (a learned scale), like a value head."""

    def setup(self, model, tokenizer) -> None:
        self.scale = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.ones_(self.scale.weight)

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"scale": self.scale}

    def loss(self, model, batch: torch.Tensor, step: int) -> LossOutput:
        logits = model(input_ids=batch).logits[:, :-1] * self.scale.weight[0, 0]
        loss, _ = sft_loss(logits, batch[:, 1:], num_tokens_in_batch=1)
        return LossOutput(loss, batch[:, 1:].numel(), batch.numel())


def _stage(**overrides) -> SFTStage:
    values = dict(method="sft", datasets=[{"id": "d"}], max_steps=6, learning_rate=1e-2, warmup_steps=1)
    return SFTStage(**{**values, **overrides})


def _train(model_dir: Path, folder: Path, method: ToyMethod, reporter: RecordingReporter,
           stage: SFTStage, resume_from: Path | None = None, keep: int = 2, every: int | None = 2,
           dropout: float = 0.1):
    torch.manual_seed(0)
    model = load_policy(model_dir, LoraAdapter(r=4, alpha=8, dropout=dropout), CPU)
    outcome = train_stage(
        model, method, stage, stage_index=0, stage_folder=folder, tokenizer=None,
        checkpoints=CheckpointPolicy(every, keep), reporter=reporter, device=CPU,
        manifest_config={"test": True}, resume_from=resume_from,
    )
    return model, outcome


def test_learning_rate_schedule() -> None:
    stage = _stage(warmup_steps=2, learning_rate=1.0, lr_scheduler="cosine")
    rates = [learning_rate_at(s, stage, 10) for s in range(1, 11)]
    assert rates[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in zip(rates[2:], rates[3:], strict=False)) and rates[-1] > 0
    linear = _stage(warmup_steps=0, learning_rate=1.0, lr_scheduler="linear")
    assert learning_rate_at(1, linear, 4) == 1.0 and learning_rate_at(4, linear, 4) == 0.25
    assert learning_rate_at(7, _stage(lr_scheduler="constant", warmup_steps=0), 9) == 1e-2


def test_accumulation_equals_one_big_batch(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Dropout off: its masks depend on the micro-batch shapes, the loss and gradient must not.
    stage = _stage(max_steps=2, warmup_steps=0)
    runs = []
    for micro, per_micro in [(1, 8), (4, 2)]:
        reporter = RecordingReporter()
        _train(tiny_model_dir, tmp_path / f"{micro}", ToyMethod(2, micro, per_micro), reporter, stage,
               every=None, dropout=0.0)
        runs.append(reporter.train_series("loss") + reporter.train_series("grad_norm"))
    assert runs[0] == pytest.approx(runs[1], abs=1e-5)


def test_stop_and_resume_reproduce_the_straight_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    stage = _stage(eval_dataset="d_eval", eval_every_steps=3)
    straight = RecordingReporter()
    model_a, outcome = _train(tiny_model_dir, tmp_path / "a", ToyMethod(6, 2, 3), straight, stage)
    assert outcome.status == "finished"

    first = RecordingReporter(stop_after_steps=4)
    _, stopped = _train(tiny_model_dir, tmp_path / "b", ToyMethod(6, 2, 3), first, stage)
    assert (stopped.status, stopped.step) == ("stopped", 4)
    second = RecordingReporter()
    resume = tmp_path / "b" / "checkpoint-00000004"
    model_b, resumed = _train(tiny_model_dir, tmp_path / "b", ToyMethod(6, 2, 3), second, stage, resume)
    assert resumed.status == "finished"

    losses = straight.train_series("loss")
    assert len(losses) == 6
    diff = max(abs(a - b) for a, b in zip(losses, first.train_series("loss") + second.train_series("loss"),
                                         strict=True))
    assert diff <= 1e-6
    weights_a, weights_b = trainable_parameters(model_a), trainable_parameters(model_b)
    assert max((weights_a[k] - weights_b[k]).abs().max().item() for k in weights_a) <= 1e-6


def test_retention_keeps_last_k_and_the_best(tiny_model_dir: Path, tmp_path: Path) -> None:
    reporter = RecordingReporter()
    folder = tmp_path / "stage"
    _train(tiny_model_dir, folder, ToyMethod(6, 1, 4), reporter,
           _stage(eval_dataset="d_eval", eval_every_steps=2, learning_rate=1e-3), keep=1, every=2)
    kept = complete_checkpoints(folder)
    evals = {read_manifest(p)["step"]: read_manifest(p)["metrics"].get("eval_loss") for p in kept}
    assert 6 in evals
    reported = {c.step: c.metrics.get("eval_loss") for c in reporter.checkpoints}
    best_step = min(reported, key=lambda s: reported[s])
    assert best_step in evals
    assert sorted(p.name for p in reporter.removed) == sorted(
        f"checkpoint-{s:08d}" for s in {2, 4} - {best_step}
    )
    assert not any(p.name.endswith(".tmp") for p in folder.iterdir())
    train_steps = [step for _, step, split, _ in reporter.metrics if split == "train"]
    assert train_steps == [1, 2, 3, 4, 5, 6]
    first = reporter.metrics[0][3]
    assert {"loss", "lr", "grad_norm", "tokens_per_second", "step_time", "acc"} <= set(first)


def test_extra_trainable_modules_train_in_the_loop_and_resume_exactly(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    stage = _stage(lr_scheduler="constant", warmup_steps=0)
    straight, method_a = RecordingReporter(), ToyMethodWithScale(6, 2, 3)
    _train(tiny_model_dir, tmp_path / "a", method_a, straight, stage)
    # Only the loop's optimizer can have moved the scale off its initial 1.0.
    assert abs(method_a.scale.weight.item() - 1.0) > 1e-3
    first = RecordingReporter(stop_after_steps=3)
    _train(tiny_model_dir, tmp_path / "b", ToyMethodWithScale(6, 2, 3), first, stage)
    second, method_b = RecordingReporter(), ToyMethodWithScale(6, 2, 3)
    _train(tiny_model_dir, tmp_path / "b", method_b, second, stage, tmp_path / "b" / "checkpoint-00000003")
    for name in ("loss", "grad_norm"):
        assert first.train_series(name) + second.train_series(name) == pytest.approx(
            straight.train_series(name), abs=1e-6
        )
    assert method_b.scale.weight.item() == pytest.approx(method_a.scale.weight.item(), abs=1e-7)
