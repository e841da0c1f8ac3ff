from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer_core.tiny import build_tiny_model


def test_folder_loads_with_auto_classes(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert len(tok) == model.config.vocab_size == 512
    assert model.config._attn_implementation == "sdpa"
    ids = tok("Thought: 12+7=19", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == tok.bos_token_id
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 512)


def test_chat_template_marks_assistant_tokens(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    trained = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tok.decode(trained) == "4<|im_end|>"
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_build_is_deterministic(tmp_path: Path, tiny_model_dir: Path) -> None:
    again = build_tiny_model(tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    assert (again / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()


def test_teacher_shares_tokenizer_but_not_weights(tiny_model_dir: Path, tiny_teacher_dir: Path) -> None:
    teacher_vocab = (tiny_teacher_dir / "tokenizer.json").read_bytes()
    assert teacher_vocab == (tiny_model_dir / "tokenizer.json").read_bytes()
    config = json.loads((tiny_teacher_dir / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (96, 3)


def test_cli_builds_a_teacher_sharing_the_students_tokenizer(tiny_model_dir: Path, tmp_path: Path) -> None:
    from trainer_core.__main__ import main

    assert main(["init-tiny", str(tmp_path / "teacher"), "--teacher-of", str(tiny_model_dir)]) == 0
    teacher = json.loads((tmp_path / "teacher" / "config.json").read_text())
    student = json.loads((tiny_model_dir / "config.json").read_text())
    assert teacher["hidden_size"] != student["hidden_size"]
    tokenizer = (tmp_path / "teacher" / "tokenizer.json").read_bytes()
    assert tokenizer == (tiny_model_dir / "tokenizer.json").read_bytes()
