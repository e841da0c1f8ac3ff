"""Shared fixtures: a tiny student model folder and a tiny teacher folder, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Returns a folder with a random tiny Llama (hidden 64, 2 layers) and its local tokenizer."""
    from trainer_core.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_teacher_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Returns a folder with a larger tiny Llama (hidden 96, 3 layers) sharing the student's tokenizer."""
    from trainer_core.tiny import build_tiny_teacher

    return build_tiny_teacher(tmp_path_factory.mktemp("tiny_teacher"), tokenizer_dir=tiny_model_dir)
