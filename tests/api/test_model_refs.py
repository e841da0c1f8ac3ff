"""Models a run names: your own (nested) base models, listing with architecture and size, checkpoints
as base_model and SAD teacher (pinned at submit), and the 422s for what cannot work."""

from __future__ import annotations

import json
import os
from itertools import count
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.db.models import Checkpoint, Run, RunStage
from app.ids import new_id
from app.services.auth import create_api_key
from app.services.models import check_model_folder, register_model
from tests.api.conftest import Backend, upload_jsonl, wait_for_dataset, write_safetensors_header

SFT = b'{"prompt": "2+2=", "completion": "4"}\n' * 4
TRAJECTORIES = b'{"text": "Thought: add them.\\nAction: answer[4]"}\n' * 4
LORA = {"type": "lora", "r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "all-linear"}
_teams = count()


def _model_folder(folder: Path, vocab: dict[str, int], chat_template: bool = True) -> Path:
    folder.mkdir(parents=True)
    config = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}
    (folder / "config.json").write_text(json.dumps(config))
    write_safetensors_header(folder / "model.safetensors", {"embed": [10, 4], "head": [4, 10], "norm": [4]})
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}, "added_tokens": []}))
    tokenizer_config = {"chat_template": "{{ messages }}"} if chat_template else {}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


@pytest.fixture(scope="module")
def own_models(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Registers `Qwen/Qwen2.5-0.5B-Instruct` (linked) and `other-vocab` into the backend's models dir."""
    root = tmp_path_factory.mktemp("own-models")
    qwen = _model_folder(root / "qwen", {"a": 0, "b": 1})
    other = _model_folder(root / "other", {"x": 0, "y": 1})
    names = {"qwen": "Qwen/Qwen2.5-0.5B-Instruct", "other": "other-vocab"}
    for key, folder in (("qwen", qwen), ("other", other)):
        if not (backend.settings.base_models_dir / names[key]).exists():
            register_model(backend.settings, folder, names[key])
    return names


@pytest.fixture
def team(backend: Backend) -> tuple[str, dict[str, str]]:
    with backend.app.state.sessions() as session:
        team, key = create_api_key(session, f"refs-{os.getpid()}-{next(_teams)}")
        return team.id, {"Authorization": f"Bearer {key}"}


def _checkpoint(backend: Backend, team_id: str, kind: str, base_model: str) -> str:
    """Returns the id of a finished checkpoint (a row; its folder is never read at submit)."""
    with backend.app.state.sessions() as session:
        run = Run(id=new_id("run"), team_id=team_id, name="parent", status="succeeded", base_model=base_model,
                  spec={"base_model": base_model, "adapter": LORA, "stages": []}, attempt=1, max_attempts=3)
        run.stages = [RunStage(index=0, method="sft", status="succeeded", step=2, total_steps=2)]
        session.add(run)
        session.flush()
        checkpoint_id = new_id("ckpt")
        session.add(Checkpoint(id=checkpoint_id, run_id=run.id, team_id=team_id, stage_index=0, step=2,
                               kind=kind, blob_prefix=f"checkpoints/{team_id}/{run.id}/{checkpoint_id}"))
        session.commit()
        return checkpoint_id


def _ready(client: TestClient, headers: dict[str, str], data: bytes) -> str:
    dataset_id = upload_jsonl(client, headers, data)["id"]
    assert wait_for_dataset(client, headers, dataset_id)["status"] == "ready"
    return dataset_id


def _sft(dataset_id: str, base_model: str, **extra: object) -> dict:
    stage = {"method": "sft", "datasets": [{"id": dataset_id}], "max_steps": 2}
    return {"base_model": base_model, "stages": [stage], **extra}


def test_models_list_architecture_size_and_nested_names(client: TestClient, team: tuple,
                                                        own_models: dict) -> None:
    _, headers = team
    models = {m["id"]: m for m in client.get("/v1/models", headers=headers).json()["data"]}
    qwen = models["Qwen/Qwen2.5-0.5B-Instruct"]
    assert qwen["kind"] == "base" and qwen["architecture"] == "Qwen2ForCausalLM"
    assert qwen["parameters"] == 10 * 4 * 2 + 4 and qwen["size_bytes"] > 0
    assert models["tiny-llama"]["architecture"] == "llama"


def test_a_slash_name_trains_and_an_unknown_one_lists_what_exists(
        client: TestClient, team: tuple, own_models: dict, backend: Backend) -> None:
    _, headers = team
    sft = _ready(client, headers, SFT)
    created = client.post("/v1/runs", json=_sft(sft, "Qwen/Qwen2.5-0.5B-Instruct"), headers=headers)
    assert created.status_code == 201, created.text
    assert created.json()["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    error = client.post("/v1/runs", json=_sft(sft, "Qwen/Qwen2.5-7B"), headers=headers).json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "base_model"
    assert str(backend.settings.base_models_dir) in error["message"]
    assert "Qwen/Qwen2.5-0.5B-Instruct" in error["message"] and "tiny-llama" in error["message"]
    assert "tuneyard models add" in error["message"]


def test_an_unknown_spec_field_suggests_the_right_one(client: TestClient, team: tuple) -> None:
    _, headers = team
    body = _sft("ds_x", "tiny-llama")
    body["stages"][0]["learning_rat"] = 1e-4
    error = client.post("/v1/runs", json=body, headers=headers).json()["error"]
    assert error["param"] == "stages[0].learning_rat"
    assert "did you mean `learning_rate`?" in error["message"]
    body = {**_sft("ds_x", "tiny-llama"), "seeed": 1}
    error = client.post("/v1/runs", json=body, headers=headers).json()["error"]
    assert "did you mean `seed`?" in error["message"]


def test_an_adapter_checkpoint_continues_with_its_adapter(client: TestClient, team: tuple,
                                                          backend: Backend) -> None:
    team_id, headers = team
    sft = _ready(client, headers, SFT)
    adapter = _checkpoint(backend, team_id, "adapter", "tiny-llama")
    created = client.post("/v1/runs", json=_sft(sft, adapter), headers=headers)
    assert created.status_code == 201, created.text
    assert created.json()["spec"]["adapter"] == LORA  # the parent's adapter, not the default r=16
    # The same adapter settings given explicitly are fine; others cannot continue that adapter.
    assert client.post("/v1/runs", json=_sft(sft, adapter, adapter=LORA), headers=headers).status_code == 201
    error = client.post("/v1/runs", json=_sft(sft, adapter, adapter={"type": "lora", "r": 32}),
                        headers=headers).json()["error"]
    assert (error["code"], error["param"]) == ("adapter_mismatch", "adapter")
    response = client.post("/v1/runs", json=_sft(sft, adapter, adapter={"type": "full"}, export=["merged"]),
                           headers=headers)
    assert response.status_code == 422 and response.json()["error"]["param"] == "adapter.type"
    merged = _checkpoint(backend, team_id, "merged", "tiny-llama")
    full = client.post("/v1/runs", json=_sft(sft, merged, adapter={"type": "full"}, export=["merged"]),
                       headers=headers)
    assert full.status_code == 201, full.text


def test_checkpoint_teachers_are_pinned_and_checked(client: TestClient, team: tuple, backend: Backend,
                                                    own_models: dict) -> None:
    team_id, headers = team
    trajectories = _ready(client, headers, TRAJECTORIES)
    adapter = _checkpoint(backend, team_id, "adapter", "Qwen/Qwen2.5-0.5B-Instruct")

    def sad(teacher: str, base_model: str = "Qwen/Qwen2.5-0.5B-Instruct") -> dict:
        return {"name": "distil", "base_model": base_model, "stages": [
            {"method": "sad", "datasets": [{"id": trajectories}], "max_steps": 2,
             "teacher": {"source": "model", "model": teacher}}]}

    with backend.app.state.sessions() as session:
        run_id = session.get(Checkpoint, adapter).run_id
    created = client.post("/v1/runs", json=sad(f"{run_id}:adapter"), headers=headers)  # an alias …
    assert created.status_code == 201, created.text
    assert created.json()["spec"]["stages"][0]["teacher"]["model"] == adapter  # … pinned to the id
    error = client.post("/v1/runs", json=sad("other-vocab"), headers=headers).json()["error"]
    assert (error["code"], error["param"]) == ("teacher_vocabulary_mismatch", "stages[0].teacher.model")
    error = client.post("/v1/runs", json=sad("ckpt_nope"), headers=headers).json()["error"]
    assert (error["code"], error["param"]) == ("model_not_found", "stages[0].teacher.model")


def test_model_folder_check_names_what_is_missing(tmp_path: Path, backend: Backend) -> None:
    good = _model_folder(tmp_path / "good", {"a": 0}, chat_template=False)
    check = check_model_folder(good)
    assert check.problems == [] and "chat template" in check.warnings[0]
    (tmp_path / "empty").mkdir()
    problems = check_model_folder(tmp_path / "empty").problems
    assert any("config.json" in p for p in problems) and any("weights" in p for p in problems)
    assert any("tokenizer" in p for p in problems)
    with pytest.raises(ValueError, match="NAME or ORG/NAME"):
        register_model(backend.settings, good, "../escape")
    with pytest.raises(ValueError, match="cannot be used"):
        register_model(backend.settings, tmp_path / "empty", "empty")
