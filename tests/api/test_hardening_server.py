"""The API under hostile connections, a database outage and a full disk (issue 13, items 7, 14, 15).

- Idle sockets and slow headers against the real server (`tuneyard api`: uvicorn with the header
  deadline): health and authenticated requests keep working, stalled clients are cut off.
- A PostgreSQL outage, made for real by cutting a TCP proxy between the API and the database:
  503 with Retry-After on /v1 routes while it lasts, 200 again once the database is back.
- A full disk, made for real with a tiny tmpfs as the storage volume: uploads get 507 and leave
  no partial file.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.api.conftest import REPO, Backend, new_team_headers, worker_env
from tests.e2e.service import free_port, stop, wait_for_http
from tests.small_disk import run_on_small_disk

IDLE_SOCKETS = 250
MAX_CONCURRENCY = 50  # far below the idle sockets: idle connections must not count as requests
SPEC = {"base_model": "tiny-llama", "stages": [{"method": "sft", "datasets": [{"id": "ds_1"}]}]}


@pytest.fixture(scope="module")
def server(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("api") / "api.log"
    env = worker_env(backend.settings) | {
        "TUNEYARD_API_HEADER_TIMEOUT_SECONDS": "1", "TUNEYARD_API_BODY_TIMEOUT_SECONDS": "1",
        "TUNEYARD_API_MAX_CONCURRENCY": str(MAX_CONCURRENCY)}
    process = subprocess.Popen([sys.executable, "-m", "tuneyard_cli", "api", "--port", str(port)], cwd=REPO,
                               env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base_url}/healthz", process, log)
        yield base_url
    finally:
        stop(process)


def _connect(base_url: str) -> socket.socket:
    host, port = base_url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def _closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """Returns what the server sent before closing, or None if it kept the connection open."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return received


# ---------------------------------------------------------------- 7. idle sockets, slow headers and bodies


def test_idle_socket_flood_does_not_refuse_real_requests(server: str, backend: Backend) -> None:
    auth = new_team_headers(backend, "flood")
    idle = [_connect(server) for _ in range(IDLE_SOCKETS)]
    try:
        with httpx.Client(base_url=server, timeout=10) as client:
            for _ in range(5):
                assert client.get("/healthz").status_code == 200
                response = client.get("/v1/runs", headers=auth)
                assert response.status_code == 200, response.text
        # The flood itself is cut off once the header deadline passes.
        assert _closed_within(idle[0], 5) == b""
    finally:
        for sock in idle:
            sock.close()


def test_slow_headers_are_cut_off(server: str) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
        started = time.monotonic()
        assert _closed_within(sock, 5) == b""
        assert time.monotonic() - started < 4
    with _connect(server) as sock:  # a keep-alive connection trickling its second request
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while not first.endswith(b'{"status":"ok"}'):
            first += sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        assert _closed_within(sock, 8) == b""


def test_stalled_body_is_408(server: str, backend: Backend) -> None:
    auth = new_team_headers(backend, "stall")
    with _connect(server) as sock:
        sock.sendall(b"POST /v1/runs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\nAuthorization: " + auth["Authorization"].encode() +
                     b"\r\n\r\n{\"base_model\":")
        sock.settimeout(5)
        answer = b""
        while b"request_timeout" not in answer and (chunk := sock.recv(4096)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer, answer


# ---------------------------------------------------------------- 14. database outage


class TcpProxy:
    """Forwards 127.0.0.1:<port> to an upstream; `cut()` drops every connection and refuses new ones."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            server = socket.create_connection(self.upstream)
            with self.lock:
                self.open += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.up = False
        with self.lock:
            for sock in self.open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.open.clear()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.cut()
        self.listener.close()


def test_database_outage_is_503_with_retry_after_and_recovers(backend: Backend) -> None:
    if backend.name != "postgres":
        pytest.skip("an embedded SQLite file has no outage to survive")
    auth = new_team_headers(backend, "outage")
    url = backend.settings.database_url
    host_port = url.split("@", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    proxy = TcpProxy((host, int(port)))
    proxied = url.replace(host_port, f"127.0.0.1:{proxy.port}")
    settings = backend.settings.model_copy(update={"database_url": proxied})
    app = create_app(settings)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            assert client.get("/v1/runs", headers=auth).status_code == 200
            proxy.cut()
            for method, path in (("GET", "/v1/runs"), ("GET", "/v1/datasets"), ("GET", "/v1/models"),
                                 ("POST", "/v1/runs")):
                response = client.request(method, path, headers=auth, json=SPEC if method == "POST" else None)
                assert response.status_code == 503, (path, response.text)
                assert response.headers["Retry-After"].isdigit()
                assert response.json()["error"]["code"] == "database_unavailable"
            assert client.get("/readyz").status_code == 503
            proxy.restore()
            response = client.get("/v1/runs", headers=auth)
            assert response.status_code == 200, response.text
    finally:
        proxy.close()
        app.state.sessions.kw["bind"].dispose()


# ---------------------------------------------------------------- 15. full disk on upload

_UPLOAD_ON_FULL_DISK = """
import json, os, sys
from fastapi.testclient import TestClient
from app.main import create_app
from app.services.auth import create_api_key
from app.settings import Settings

settings = Settings()
app = create_app(settings)
with app.state.sessions() as session:
    _, key = create_api_key(session, "full-disk-" + str(os.getpid()))
auth = {"Authorization": "Bearer " + key}
line = b'{"prompt": "2+2=", "completion": "4"}' + b"\\n"
body = line * (400 * 1024 // len(line))
out = {}
with TestClient(app, raise_server_exceptions=False) as client:
    raw = client.post("/v1/datasets", content=body, headers={**auth, "Content-Type": "application/jsonl"})
    form = client.post("/v1/datasets", files={"file": ("t.jsonl", body, "application/jsonl")}, headers=auth)
    small = client.post("/v1/datasets", content=line, headers={**auth, "Content-Type": "application/jsonl"})
    listed = client.get("/v1/datasets", headers=auth).json()["data"]
out = {"raw": [raw.status_code, raw.json()], "form": [form.status_code, form.json()],
       "small": small.status_code, "listed": len(listed),
       "tmp": os.listdir(settings.storage_dir / ".tmp")}
print(json.dumps(out))
"""


def test_upload_on_a_full_disk_is_507_and_leaves_nothing(backend: Backend, tmp_path: Path) -> None:
    storage = tmp_path / "small-volume"
    env = worker_env(backend.settings) | {"TUNEYARD_STORAGE_DIR": str(storage)}
    out = run_on_small_disk(_UPLOAD_ON_FULL_DISK, storage, 256 * 1024, env)
    for kind in ("raw", "form"):
        status, body = out[kind]
        assert status == 507, out
        assert body["error"]["code"] == "storage_full" and "full" in body["error"]["message"]
    assert out["small"] == 201 and out["listed"] == 1  # space freed by the cleanup is usable again
    assert out["tmp"] == []
    assert json.dumps(out).count("malformed") == 0
