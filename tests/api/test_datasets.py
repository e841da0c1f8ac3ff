"""Datasets over HTTP with a real worker validating uploads (runs on SQLite and PostgreSQL)."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from app.main import create_app
from tests.api.conftest import Backend, upload_jsonl, wait_for_dataset

SFT = b"".join(
    json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                             {"role": "assistant", "content": f"a{i}"}]}).encode() + b"\n"
    for i in range(5)
)


def test_multipart_upload_becomes_ready_with_counts(client: TestClient, auth: dict) -> None:
    response = client.post("/v1/datasets", headers=auth, files={"file": ("train.jsonl", SFT)},
                           data={"purpose": "fine-tune"})
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["status"] == "validating" and created["name"] == "train.jsonl"
    assert created["size_bytes"] == len(SFT)
    done = wait_for_dataset(client, auth, created["id"])
    assert done["status"] == "ready", done
    assert done["num_records"] == 5 and done["format"] == "sft" and done["errors"] == []
    assert done["stats"]


def test_raw_upload_with_format_and_name(client: TestClient, auth: dict) -> None:
    data = b'{"prompt": "2+2?", "chosen": "4", "rejected": "5"}\n' * 3
    created = upload_jsonl(client, auth, data, format="preference", name="prefs")
    assert created["name"] == "prefs" and created["format"] == "preference"
    done = wait_for_dataset(client, auth, created["id"])
    assert (done["status"], done["num_records"]) == ("ready", 3)


def test_bom_crlf_and_blank_lines_are_accepted(client: TestClient, auth: dict) -> None:
    data = b"\xef\xbb\xbf" + b'{"text": "one"}\r\n\r\n{"text": "two"}\r\n\n'
    done = wait_for_dataset(client, auth, upload_jsonl(client, auth, data)["id"])
    assert (done["status"], done["num_records"], done["format"]) == ("ready", 2, "sft")


def _first_error(client: TestClient, auth: dict, data: bytes, **params: str) -> tuple[dict, dict]:
    done = wait_for_dataset(client, auth, upload_jsonl(client, auth, data, **params)["id"])
    assert done["status"] == "invalid", done
    return done, done["errors"][0]


def test_non_utf8_line_is_reported_with_its_line(client: TestClient, auth: dict) -> None:
    _, error = _first_error(client, auth, b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert error["line"] == 2 and error["message"]


def test_non_object_line_is_reported(client: TestClient, auth: dict) -> None:
    _, error = _first_error(client, auth, b'{"text": "ok"}\n\n[1, 2, 3]\n')
    assert error["line"] == 3 and "object" in error["message"].lower()


def test_field_errors_name_the_field(client: TestClient, auth: dict) -> None:
    data = b'{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p", "chosen": "c"}\n'
    _, error = _first_error(client, auth, data, format="preference")
    assert error["line"] == 2 and error["field"]


def test_50mb_single_line_is_reported(client: TestClient, auth: dict) -> None:
    data = b'{"text": "' + b"x" * (50 * 1024 * 1024) + b'"}\n{"text": "fine"}\n'
    done, error = _first_error(client, auth, data)
    assert error["line"] == 1 and "line limit" in error["message"]
    assert done["size_bytes"] == len(data)


def test_upload_over_limit_is_413_and_leaves_nothing(backend: Backend, auth: dict) -> None:
    small = create_app(backend.settings.model_copy(update={"max_upload_bytes": 256 * 1024}))
    store_root = backend.settings.storage_dir

    def files() -> set[str]:
        return {str(p.relative_to(store_root)) for p in store_root.rglob("*") if p.is_file()}

    before = files()
    with TestClient(small, raise_server_exceptions=False) as c:
        def chunks():
            for _ in range(100):
                yield b'{"text": "' + b"y" * 8180 + b'"}\n'

        raw = {**auth, "Content-Type": "application/jsonl"}
        streamed = c.post("/v1/datasets", content=chunks(), headers=raw)
        declared = c.post("/v1/datasets", content=b"z" * (512 * 1024),
                          headers={**auth, "Content-Type": "application/jsonl"})
        multipart = c.post("/v1/datasets", files={"file": ("big.jsonl", b"w" * (300 * 1024))}, headers=auth)
        listed = c.get("/v1/datasets", headers=auth).json()
    for response in (streamed, declared, multipart):
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "payload_too_large"
    assert files() == before
    assert listed["data"] == []


def test_list_paginates_with_cursor(client: TestClient, auth: dict) -> None:
    ids = [upload_jsonl(client, auth, b'{"text": "t"}\n', name=f"d{i}")["id"] for i in range(5)]
    seen, after = [], None
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        page = client.get("/v1/datasets", headers=auth, params=params)
        body = page.json()
        assert body["object"] == "list" and len(body["data"]) <= 2
        seen += [d["id"] for d in body["data"]]
        if not body["has_more"]:
            assert body["next_cursor"] is None
            break
        after = body["next_cursor"]
    assert seen == sorted(ids, reverse=True)


def test_preview_returns_first_records(client: TestClient, auth: dict) -> None:
    created = upload_jsonl(client, auth, SFT)
    preview = client.get(f"/v1/datasets/{created['id']}/preview", params={"limit": 2}, headers=auth).json()
    assert len(preview["data"]) == 2 and preview["data"][0]["messages"][0]["content"] == "q0"


def test_delete_removes_row_and_blob(backend: Backend, client: TestClient, auth: dict) -> None:
    created = wait_for_dataset(client, auth, upload_jsonl(client, auth, SFT)["id"])
    with backend.app.state.sessions() as session:
        from app.db.models import Dataset

        key = session.get(Dataset, created["id"]).blob_key
    assert backend.app.state.store.exists(key)
    assert client.delete(f"/v1/datasets/{created['id']}", headers=auth).json()["deleted"] is True
    assert client.get(f"/v1/datasets/{created['id']}", headers=auth).status_code == 404
    assert not backend.app.state.store.exists(key)


def test_other_team_gets_404(client: TestClient, auth: dict, other_auth: dict) -> None:
    created = upload_jsonl(client, auth, SFT)
    for method, path in [("GET", ""), ("GET", "/preview"), ("DELETE", "")]:
        response = client.request(method, f"/v1/datasets/{created['id']}{path}", headers=other_auth)
        assert response.status_code == 404
        assert response.json()["error"]["type"] == "not_found_error"
    listed = client.get("/v1/datasets", headers=other_auth).json()["data"]
    assert created["id"] not in [d["id"] for d in listed]


def test_unknown_format_and_content_type(client: TestClient, auth: dict) -> None:
    bad_format = client.post("/v1/datasets", params={"format": "csv"}, content=b"{}\n",
                             headers={**auth, "Content-Type": "application/jsonl"})
    assert bad_format.status_code == 422 and bad_format.json()["error"]["param"] == "format"
    bad_type = client.post("/v1/datasets", content=b"a,b\n", headers={**auth, "Content-Type": "text/csv"})
    assert bad_type.status_code == 415
    no_file = client.post("/v1/datasets", files={"other": ("x", b"{}")}, headers=auth)
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
