"""Runs over HTTP: validation paths, dataset checks, idempotency, cancel, listing, events."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.db.models import Run
from app.jobs.states import RUN, transition_atomically
from tests.api.conftest import Backend, upload_jsonl, wait_for_dataset

SFT = b'{"prompt": "2+2=", "completion": "4"}\n' * 4
PREFS = b'{"prompt": "2+2=", "chosen": "4", "rejected": "5"}\n' * 4


@pytest.fixture
def ready(client: TestClient, auth: dict) -> dict[str, str]:
    """Returns ids of a ready sft and a ready preference dataset of the `auth` team."""
    sft = upload_jsonl(client, auth, SFT)["id"]
    prefs = upload_jsonl(client, auth, PREFS)["id"]
    for dataset_id in (sft, prefs):
        assert wait_for_dataset(client, auth, dataset_id)["status"] == "ready"
    return {"sft": sft, "preference": prefs}


def spec(ready: dict[str, str], **overrides) -> dict:
    body = {
        "name": "two-stage", "base_model": "tiny-llama",
        "stages": [
            {"method": "sft", "datasets": [{"id": ready["sft"]}], "max_steps": 5},
            {"method": "dpo", "datasets": [{"id": ready["preference"]}], "beta": 0.1, "max_steps": 5},
        ],
    }
    body.update(overrides)
    return body


def test_create_get_and_list(client: TestClient, auth: dict, ready: dict) -> None:
    response = client.post("/v1/runs", json=spec(ready), headers=auth)
    assert response.status_code == 201, response.text
    run = response.json()
    assert run["status"] == "queued" and run["object"] == "run" and run["attempt"] == 0
    assert [(s["index"], s["method"], s["status"]) for s in run["stages"]] == [
        (0, "sft", "pending"), (1, "dpo", "pending")]
    assert run["progress"]["fraction"] == 0 and run["spec"]["stages"][1]["beta"] == 0.1
    assert client.get(f"/v1/runs/{run['id']}", headers=auth).json()["id"] == run["id"]
    queued = client.get("/v1/runs", params={"status": "queued"}, headers=auth).json()
    assert run["id"] in [r["id"] for r in queued["data"]]
    events = client.get(f"/v1/runs/{run['id']}/events", headers=auth).json()
    assert [e["kind"] for e in events["data"]] == ["queued"]


def test_spec_errors_name_the_field_path(client: TestClient, auth: dict, ready: dict) -> None:
    body = spec(ready)
    body["stages"][1]["beta"] = -1
    error = client.post("/v1/runs", json=body, headers=auth).json()["error"]
    assert error["param"] == "stages[1].beta" and error["type"] == "invalid_request_error"
    body = spec(ready, adapter={"type": "lora", "r": 0})
    assert client.post("/v1/runs", json=body, headers=auth).json()["error"]["param"] == "adapter.r"
    body = spec(ready)
    body["stages"][0]["datasets"][0]["weight"] = 0
    error = client.post("/v1/runs", json=body, headers=auth).json()["error"]
    assert error["param"] == "stages[0].datasets[0].weight"


def test_dataset_checks(client: TestClient, auth: dict, other_auth: dict, ready: dict) -> None:
    body = spec(ready)
    body["stages"][1]["datasets"] = [{"id": ready["preference"]}, {"id": "ds_missing"}]
    response = client.post("/v1/runs", json=body, headers=auth)
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "stages[1].datasets[1].id"
    # another team's dataset does not exist for this team
    response = client.post("/v1/runs", json=spec(ready), headers=other_auth)
    assert response.status_code == 422 and response.json()["error"]["code"] == "dataset_not_found"
    # method/format mismatch: dpo cannot train on an sft dataset
    body = spec(ready)
    body["stages"][1]["datasets"] = [{"id": ready["sft"]}]
    error = client.post("/v1/runs", json=body, headers=auth).json()["error"]
    assert (error["code"], error["param"]) == ("dataset_format_mismatch", "stages[1].datasets[0].id")


def test_invalid_dataset_is_422(client: TestClient, auth: dict, ready: dict) -> None:
    bad = upload_jsonl(client, auth, b"not json\n")["id"]
    assert wait_for_dataset(client, auth, bad)["status"] == "invalid"
    body = spec(ready)
    body["stages"][0]["datasets"] = [{"id": bad}]
    error = client.post("/v1/runs", json=body, headers=auth).json()["error"]
    assert (error["code"], error["param"]) == ("dataset_invalid", "stages[0].datasets[0].id")


def test_unknown_base_model_is_422(client: TestClient, auth: dict, ready: dict) -> None:
    for name in ("no-such-model", "../etc", "ckpt_unknown"):
        response = client.post("/v1/runs", json=spec(ready, base_model=name), headers=auth)
        assert response.status_code == 422 and response.json()["error"]["param"] == "base_model"


def test_idempotency_key(client: TestClient, auth: dict, ready: dict) -> None:
    headers = {**auth, "Idempotency-Key": "retry-1"}
    first = client.post("/v1/runs", json=spec(ready), headers=headers)
    again = client.post("/v1/runs", json=spec(ready), headers=headers)
    assert first.status_code == again.status_code == 201
    assert first.json()["id"] == again.json()["id"] and again.headers["idempotent-replayed"] == "true"
    different = client.post("/v1/runs", json=spec(ready, name="other"), headers=headers)
    assert different.status_code == 409 and different.json()["error"]["code"] == "idempotency_key_reused"
    listed = client.get("/v1/runs", headers=auth).json()["data"]
    assert [r["id"] for r in listed].count(first.json()["id"]) == 1


def test_cancel(backend: Backend, client: TestClient, auth: dict, ready: dict) -> None:
    queued = client.post("/v1/runs", json=spec(ready), headers=auth).json()
    cancelled = client.post(f"/v1/runs/{queued['id']}/cancel", headers=auth).json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"]
    assert client.post(f"/v1/runs/{queued['id']}/cancel", headers=auth).status_code == 409

    running = client.post("/v1/runs", json=spec(ready), headers=auth).json()
    with backend.app.state.sessions() as session:  # what a worker's claim does
        run = session.get(Run, running["id"])
        assert transition_atomically(session, RUN, run, "running", attempt=1, lease_owner="test")
        session.commit()
    response = client.post(f"/v1/runs/{running['id']}/cancel", headers=auth)
    assert response.json()["status"] == "cancelling"
    assert client.post(f"/v1/runs/{running['id']}/cancel", headers=auth).json()["status"] == "cancelling"
    kinds = [e["kind"] for e in client.get(f"/v1/runs/{running['id']}/events", headers=auth).json()["data"]]
    assert kinds == ["queued", "cancel_requested"]


def test_dataset_in_use_cannot_be_deleted(client: TestClient, auth: dict, ready: dict) -> None:
    run = client.post("/v1/runs", json=spec(ready), headers=auth).json()
    response = client.delete(f"/v1/datasets/{ready['sft']}", headers=auth)
    assert response.status_code == 409 and response.json()["error"]["code"] == "dataset_in_use"
    client.post(f"/v1/runs/{run['id']}/cancel", headers=auth)
    assert client.delete(f"/v1/datasets/{ready['sft']}", headers=auth).status_code == 200


def test_list_pagination_and_status_filter(client: TestClient, auth: dict, ready: dict) -> None:
    ids = [client.post("/v1/runs", json=spec(ready), headers=auth).json()["id"] for _ in range(5)]
    client.post(f"/v1/runs/{ids[0]}/cancel", headers=auth)
    page1 = client.get("/v1/runs", params={"limit": 3}, headers=auth).json()
    page2 = client.get("/v1/runs", params={"limit": 3, "after": page1["next_cursor"]}, headers=auth).json()
    assert page1["has_more"] and not page2["has_more"]
    assert [r["id"] for r in page1["data"] + page2["data"]] == ids[::-1]
    cancelled = client.get("/v1/runs", params={"status": "cancelled"}, headers=auth).json()["data"]
    assert [r["id"] for r in cancelled] == [ids[0]]
    assert client.get("/v1/runs", params={"status": "bogus"}, headers=auth).status_code == 422


def test_other_team_gets_404_on_runs(client: TestClient, auth: dict, other_auth: dict, ready: dict) -> None:
    run_id = client.post("/v1/runs", json=spec(ready), headers=auth).json()["id"]
    for method, path in [("GET", ""), ("POST", "/cancel"), ("GET", "/events")]:
        assert client.request(method, f"/v1/runs/{run_id}{path}", headers=other_auth).status_code == 404
