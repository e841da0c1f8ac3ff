from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from trainer_core.config import LoraAdapter, SADStage
from trainer_core.errors import TrainingDataError
from trainer_core.loop import CheckpointPolicy, train_stage
from trainer_core.methods import build_method
from trainer_core.methods.base import StageContext
from trainer_core.methods.sad import SADBatch, SADMethod
from trainer_core.modeling import ReferencePolicy, load_policy, load_tokenizer, save_policy_weights
from trainer_core.reporting import RecordingReporter
from trainer_core.spans import OBSERVATION, trajectory_token_spans
from trainer_core.tiny import build_tiny_teacher

CPU = torch.device("cpu")
ADAPTER = LoraAdapter(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj", "lm_head"])
TRAJECTORIES = [
    {
        "prompt": f"What is {a}+{b}?",
        "text": f"Thought: I need to add {a} and {b}.\nAction: calculator[{a}+{b}]\n"
        f"Observation: {a + b}\nThought: The tool says {a + b}.\nAnswer: {a + b}",
    }
    for a, b in [(12, 7), (3, 40), (25, 25)]
] + [{"prompt": "Say hi.", "text": "Thought: greet.\nAnswer: hello"}]


def _stage(**overrides: object) -> SADStage:
    fields: dict = {
        "method": "sad", "datasets": [{"id": "ds_traj"}], "max_steps": 25, "learning_rate": 2e-2,
        "batch_size": 2, "gradient_accumulation": 2, "lr_scheduler": "constant", "max_seq_len": 128,
        "teacher": {"source": "model", "model": "tiny-teacher", "top_k": 512},
    }
    return SADStage.model_validate(fields | overrides)


def _context(
    tmp_path: Path, model_dir: Path, teacher_dir: Path, stage: SADStage, records: list[dict]
) -> StageContext:
    start = tmp_path / "start"
    if not start.exists():
        torch.manual_seed(0)
        save_policy_weights(load_policy(model_dir, ADAPTER, CPU), start)
    return StageContext(
        stage=stage, stage_index=0, seed=1, adapter=ADAPTER, tokenizer=load_tokenizer(model_dir),
        train_records=records, eval_records=[], device=CPU, work_dir=tmp_path,
        reference=ReferencePolicy(start, ADAPTER, CPU), resolve_model=lambda name: teacher_dir,
    )


def _kl_on_spans(student: torch.nn.Module, teacher: torch.nn.Module, batches: list[SADBatch]) -> float:
    """Returns the mean dense KL(teacher || student) over reasoning and action target positions."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            mask = batch.reasoning_mask | batch.action_mask
            s = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.log_softmax(-1)
            t = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.log_softmax(-1)
            kl = (t.exp() * (t - s)).sum(-1)
            total += float(kl[mask].sum())
            count += int(mask.sum())
    return total / count


def test_sad_halves_the_students_kl_to_the_teacher(
    tmp_path: Path, tiny_model_dir: Path, tiny_teacher_dir: Path
) -> None:
    stage = _stage()
    ctx = _context(tmp_path, tiny_model_dir, tiny_teacher_dir, stage, TRAJECTORIES)
    method = build_method(ctx)
    model = load_policy(tiny_model_dir, ADAPTER, CPU, start_dir=tmp_path / "start")
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    batches = [b for step in (1, 2) for b in method.micro_batches(model, step)]  # every trajectory
    before = _kl_on_spans(model.eval(), teacher, batches)
    reporter = RecordingReporter()
    train_stage(
        model, method, stage, stage_index=0, stage_folder=tmp_path / "stage", tokenizer=ctx.tokenizer,
        checkpoints=CheckpointPolicy(every_steps=None, keep=1), reporter=reporter, device=CPU,
        manifest_config={},
    )
    after = _kl_on_spans(model.eval(), teacher, batches)
    print(f"SAD KL(teacher||student) on reasoning+action tokens {before:.4f} -> {after:.4f}")
    assert after <= 0.5 * before
    assert {"kl/reasoning", "kl/action", "loss/reasoning", "loss/action"} <= set(reporter.metrics[-1][3])


def _with_random_rows(record: dict, tokenizer: object, seed: int) -> dict:
    ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"]
    generator = torch.Generator().manual_seed(seed)
    top_ids = [torch.randperm(400, generator=generator)[:5].tolist() for _ in ids]
    logprobs = [(-torch.rand(5, generator=generator) * 6 - 0.5).tolist() for _ in ids]
    return {**record, "teacher_logprobs": {"top_k_ids": top_ids, "top_k_logprobs": logprobs, "offset": 0}}


def test_observation_rows_of_the_teacher_do_not_change_the_loss(
    tmp_path: Path, tiny_model_dir: Path, tiny_teacher_dir: Path
) -> None:
    stage = _stage(teacher={"source": "dataset"}, batch_size=1, gradient_accumulation=1)
    tokenizer = load_tokenizer(tiny_model_dir)
    record = _with_random_rows(TRAJECTORIES[0], tokenizer, seed=0)
    traj = trajectory_token_spans(tokenizer, record, stage.markers, stage.max_seq_len)
    assert traj is not None
    types = traj.span_type_ids[traj.trajectory_start :]
    other = _with_random_rows(TRAJECTORIES[0], tokenizer, seed=1)["teacher_logprobs"]
    rows = record["teacher_logprobs"]

    def variant(replace: object) -> dict:
        mixed = {key: [other[key][i] if replace(types[i]) else rows[key][i] for i in range(len(types) - 1)]
                 for key in ("top_k_ids", "top_k_logprobs")}
        return {**record, "teacher_logprobs": {**mixed, "offset": 0}}

    model = load_policy(tiny_model_dir, ADAPTER, CPU)

    def loss_of(rec: dict) -> float:
        method = SADMethod(_context(tmp_path, tiny_model_dir, tiny_teacher_dir, stage, [rec]))
        (batch,) = method.micro_batches(model, 1)
        assert batch.teacher is not None and batch.teacher.available.any()
        return float(method.loss(model, batch, 1).loss)

    base = loss_of(variant(lambda kind: False))
    assert loss_of(variant(lambda kind: kind == OBSERVATION)) == base
    assert loss_of(variant(lambda kind: kind != OBSERVATION)) != pytest.approx(base)


def test_teacher_with_another_tokenizer_is_refused_before_training(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    other = build_tiny_teacher(tmp_path / "other", vocab_size=300, hidden_size=32, num_layers=1)
    ctx = _context(tmp_path, tiny_model_dir, other, _stage(), TRAJECTORIES)
    with pytest.raises(TrainingDataError, match="different tokenizer"):
        build_method(ctx)


def test_curriculum_orders_trajectories_simple_first(tmp_path: Path, tiny_model_dir: Path) -> None:
    stage = _stage(teacher={"source": "dataset"}, curriculum=True, batch_size=4, gradient_accumulation=1)
    method = build_method(_context(tmp_path, tiny_model_dir, tiny_model_dir, stage, TRAJECTORIES))
    (batch,) = method.micro_batches(torch.nn.Identity(), 1)
    lengths = batch.attention_mask.sum(dim=-1).tolist()
    assert lengths[0] == min(lengths)  # the one-thought "Say hi." trajectory comes first
    assert batch.teacher is None  # no rows stored: cross-entropy on the trajectory's tokens
