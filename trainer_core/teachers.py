"""Teacher distributions for SAD distillation: stored in the dataset, from a local model, or from SGLang.

Alignment convention (the one ``losses.sad`` uses): a teacher distribution at position t of a
sequence is the teacher's prediction of token t+1, exactly like the student's logits at t. Every
source returns a ``TeacherBatch`` shaped like the student's [B, T] batch, with ``available``
marking the positions the source has a distribution for.

Distillation compares token ids across the two models, so teacher and student must share one
vocabulary; every source checks it before training (``TrainingDataError`` otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from trainer_core.errors import TrainingDataError
from trainer_core.losses.chunked import map_logit_chunks
from trainer_core.losses.sad import DenseTeacher, SparseTeacher, Teacher
from trainer_core.model_folders import ModelFolders
from trainer_core.modeling import frozen_dtype, head_inputs
from trainer_core.spans import TokenizedTrajectory

# Printable ASCII text for the SGLang vocabulary probe: its tokens decode to the same strings in
# any tokenizer that has them, so differing texts mean differing vocabularies.
PROBE_TEXT = "Thought: I need to add 12 and 7.\nAction: calculator[12+7]\nObservation: 19\nAnswer: 19"


@dataclass(frozen=True)
class TeacherBatch:
    """A teacher distribution on a student batch's positions and where it exists (``available`` [B, T])."""

    teacher: Teacher
    available: torch.Tensor

    def to(self, device: torch.device) -> TeacherBatch:
        """Returns the same distributions on ``device``."""
        t = self.teacher
        moved: Teacher = (
            DenseTeacher(t.logits.to(device)) if isinstance(t, DenseTeacher)
            else SparseTeacher(t.token_ids.to(device), t.logprobs.to(device))
        )
        return TeacherBatch(moved, self.available.to(device))


def check_same_vocabulary(
    student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, teacher_name: str
) -> None:
    """Returns nothing; raises TrainingDataError when the tokenizers map any token to different ids."""
    student_vocab, teacher_vocab = student.get_vocab(), teacher.get_vocab()
    if student_vocab == teacher_vocab:
        return
    differing = sorted(
        token for token in student_vocab.keys() | teacher_vocab.keys()
        if student_vocab.get(token) != teacher_vocab.get(token)
    )
    raise TrainingDataError(
        f"teacher {teacher_name!r} has a different tokenizer than the student "
        f"({len(teacher_vocab)} vs {len(student_vocab)} tokens; {len(differing)} differ, e.g. "
        f"{differing[:3]}): distillation needs the same vocabulary and ids — pick a teacher from the "
        "student's model family"
    )


def _sparse_padding(batch: int, width: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Positions without a teacher get a harmless uniform top-k over distinct ids; `available` keeps
    # them out of the loss.
    ids = torch.arange(top_k).expand(batch, width, top_k).clone()
    logprobs = torch.full((batch, width, top_k), -math.log(top_k))
    return ids, logprobs


def stored_teacher(
    trajectories: Sequence[TokenizedTrajectory], width: int, vocab_size: int
) -> TeacherBatch | None:
    """Returns the stored top-k rows on a right-padded batch's positions (None when no record has any).

    ``spans.trajectory_token_spans`` already aligned the rows to the ids (through truncation):
    row i predicts token ``teacher_start + i``, so it lands on position ``teacher_start + i - 1``.
    Rows of a batch are cut to the smallest k among its records, each row keeping its most likely
    entries. Raises TrainingDataError on ids outside the student's vocabulary.
    """
    stored = [t for t in trajectories if t.teacher_start is not None]
    if not stored:
        return None
    top_k = min(len(t.teacher_top_k_ids[0]) for t in stored)
    ids, logprobs = _sparse_padding(len(trajectories), width, top_k)
    available = torch.zeros(len(trajectories), width, dtype=torch.bool)
    for b, traj in enumerate(trajectories):
        if traj.teacher_start is None:
            continue
        row_ids = torch.tensor(traj.teacher_top_k_ids, dtype=torch.long)
        if int(row_ids.max()) >= vocab_size:
            raise TrainingDataError(
                f"teacher_logprobs.top_k_ids has id {int(row_ids.max())} outside the student's vocabulary "
                f"({vocab_size} tokens): the log-probs come from another tokenizer"
            )
        row_logprobs, order = torch.tensor(traj.teacher_top_k_logprobs).float().sort(dim=-1, descending=True)
        positions = traj.teacher_start - 1 + torch.arange(len(row_ids))
        # Nothing precedes position 0, so a row predicting token 0 has no position to sit on.
        keep = positions >= 0
        ids[b, positions[keep]] = row_ids.gather(-1, order)[keep, :top_k]
        logprobs[b, positions[keep]] = row_logprobs[keep, :top_k]
        available[b, positions[keep]] = True
    return TeacherBatch(SparseTeacher(ids, logprobs), available)


def _load_teacher_model(folders: ModelFolders, dtype: torch.dtype) -> tuple[torch.nn.Module, Path]:
    """Returns the teacher model (base, merged, or adapter over its base) and the folder of its tokenizer."""
    if not folders.weights.is_dir():
        what = f"teacher adapter {folders.adapter} applies to" if folders.adapter else "teacher"
        raise TrainingDataError(f"{what} {folders.weights}, which is not available here")
    model = AutoModelForCausalLM.from_pretrained(folders.weights, dtype=dtype)
    if folders.adapter is None:
        return model, folders.weights
    model = PeftModel.from_pretrained(model, folders.adapter)
    has_tokenizer = (folders.adapter / "tokenizer_config.json").exists()
    return model, folders.adapter if has_tokenizer else folders.weights


class LocalTeacher:
    """A teacher model run in-process: a base model folder, a merged folder, or a PEFT adapter (a folder
    whose config names its base, or ``ModelFolders`` giving the base).

    ``top_k=None`` gives the dense distribution (all logits); otherwise the top-k log-probs.
    """

    def __init__(self, model: ModelFolders | Path | str, top_k: int | None,
                 device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.top_k = top_k
        folders = model if isinstance(model, ModelFolders) else ModelFolders.of(Path(model))
        loaded, tokenizer_dir = _load_teacher_model(folders, frozen_dtype(self.device))
        self.model = loaded.to(self.device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.name = str(folders.adapter or folders.weights)

    def check_vocabulary(self, student: PreTrainedTokenizerBase) -> None:
        """Returns nothing; raises TrainingDataError when the student's tokenizer differs."""
        check_same_vocabulary(student, self.tokenizer, self.name)

    @torch.no_grad()
    def distributions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TeacherBatch:
        """Returns the teacher's distribution at every real position of a right-padded batch."""
        inputs = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}
        available = attention_mask.bool().to(self.device)
        if self.top_k is None:
            return TeacherBatch(DenseTeacher(self.model(**inputs).logits.float()), available)
        out = head_inputs(self.model, inputs)
        top_k = self.top_k

        def top(logits: torch.Tensor, where: slice) -> tuple[torch.Tensor, torch.Tensor]:
            return logits.float().log_softmax(dim=-1).topk(top_k, dim=-1)

        # A chunk of positions at a time: the full-vocabulary log-softmax of a long batch is never held.
        flat = out.hidden.reshape(-1, out.hidden.shape[-1])
        logprobs, ids = map_logit_chunks(flat, out.head, top, out.vocab)
        shape = (*input_ids.shape, top_k)
        return TeacherBatch(SparseTeacher(ids.view(shape), logprobs.view(shape)), available)


class SGLangTeacher:
    """Prompt top-k log-probs from an SGLang server's native ``POST /generate`` (no sglang install).

    The request scores the given ids without generating (``max_new_tokens: 0``, ``logprob_start_len:
    0``); ``meta_info.input_top_logprobs`` has one entry per input token, entry i being the top-k
    ``[logprob, token_id, text]`` for predicting token i (entry 0 is null: nothing precedes it). So
    the distribution at student position t is entry t+1, and the last position has none.
    """

    def __init__(
        self, url: str, top_k: int, client: httpx.Client | None = None, timeout_s: float = 120.0
    ) -> None:
        self.url = url.rstrip("/")
        self.top_k = top_k
        self._client = client or httpx.Client(timeout=timeout_s)

    def _generate(self, sequences: list[list[int]], with_text: bool = False) -> list[dict[str, Any]]:
        """Returns SGLang's ``meta_info`` for each sequence (one batched request)."""
        payload = {
            "input_ids": sequences,
            "sampling_params": {"max_new_tokens": 0},
            "return_logprob": True,
            "logprob_start_len": 0,
            "top_logprobs_num": self.top_k,
            "return_text_in_logprobs": with_text,
        }
        try:
            response = self._client.post(f"{self.url}/generate", json=payload)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise RuntimeError(f"SGLang teacher at {self.url} failed to score the batch: {exc}") from exc
        body = response.json()
        items = body if isinstance(body, list) else [body]
        if len(items) != len(sequences):
            raise RuntimeError(f"SGLang returned {len(items)} results for {len(sequences)} sequences")
        return [item["meta_info"] for item in items]

    def check_vocabulary(self, student: PreTrainedTokenizerBase) -> None:
        """Returns nothing; raises TrainingDataError when the server's tokens read differently.

        Sends a probe text tokenised by the student and compares the text the server gives for each
        echoed id with the student's decoding of it.
        """
        probe = student(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        meta = self._generate([probe], with_text=True)[0]
        served = [entry for entry in meta["input_token_logprobs"] if entry is not None]
        mismatched = [
            (int(token_id), text, student.decode([int(token_id)]))
            for _, token_id, text in served
            if text != student.decode([int(token_id)])
        ]
        if mismatched:
            token_id, theirs, ours = mismatched[0]
            raise TrainingDataError(
                f"SGLang teacher at {self.url} has a different tokenizer than the student: token "
                f"{token_id} reads {theirs!r} there and {ours!r} here; serve a model that shares the "
                "student's vocabulary"
            )

    def distributions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TeacherBatch:
        """Returns the server's top-k at every position of a right-padded batch that predicts a real token."""
        batch, width = input_ids.shape
        lengths = attention_mask.sum(dim=-1).tolist()
        sequences = [input_ids[b, : lengths[b]].tolist() for b in range(batch)]
        ids, logprobs = _sparse_padding(batch, width, self.top_k)
        available = torch.zeros(batch, width, dtype=torch.bool)
        for b, meta in enumerate(self._generate(sequences)):
            entries = meta["input_top_logprobs"]
            if len(entries) != lengths[b]:
                raise RuntimeError(
                    f"SGLang returned {len(entries)} input_top_logprobs for {lengths[b]} input tokens"
                )
            for position, entry in enumerate(entries[1:]):
                row = sorted(entry, key=lambda item: item[0], reverse=True)[: self.top_k]
                if len(row) < self.top_k:
                    raise RuntimeError(f"SGLang returned {len(row)} top logprobs, asked for {self.top_k}")
                logprobs[b, position] = torch.tensor([float(item[0]) for item in row])
                ids[b, position] = torch.tensor([int(item[1]) for item in row])
                available[b, position] = True
        return TeacherBatch(SparseTeacher(ids, logprobs), available)
