"""Browser tests: the real API in a uvicorn subprocess on a fresh SQLite database, driven by Debian's
chromium through Playwright. Skipped when chromium or Playwright is missing."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REPO_ROOT = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.browser)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """Returns the environment of a service process on its own embedded data folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEYARD_")}
    env.update(TUNEYARD_DATA_DIR=str(data_dir), TUNEYARD_ENV="test", PYTHONUNBUFFERED="1", **extra)
    return env


def wait_for_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"service exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer in {timeout}s:\n{log.read_text()[-4000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class LiveService:
    """A running API process, its database (for seeding) and an API key of one team."""

    base_url: str
    key: str
    team_id: str
    data_dir: Path
    sessions: sessionmaker[Session]
    processes: list[subprocess.Popen] = field(default_factory=list)

    def client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.key}"}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)


def start_api(data_dir: Path, log_dir: Path) -> tuple[subprocess.Popen, str]:
    """Starts uvicorn on the app factory and returns (process, base_url) once /healthz answers."""
    port = free_port()
    log = log_dir / "api.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "tests.e2e.app_factory:build_app", "--factory",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        cwd=REPO_ROOT, env=service_env(data_dir), stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    base_url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{base_url}/healthz", process, log)
    return process, base_url


@pytest.fixture(scope="module")
def live_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    """Yields the real API on a migrated SQLite database with one team key."""
    from app.db.migrate import migrate
    from app.db.session import make_session_factory
    from app.services.auth import create_api_key
    from app.settings import Settings

    data_dir = tmp_path_factory.mktemp("tuneyard")
    settings = Settings(data_dir=data_dir, env="test")
    migrate(settings.database_url)
    sessions = make_session_factory(settings)
    with sessions() as session:
        team, key = create_api_key(session, "browser-tests")
    process, base_url = start_api(data_dir, data_dir)
    service = LiveService(base_url, key, team.id, data_dir, sessions, [process])
    yield service
    for p in service.processes:
        stop(p)
    sessions.kw["bind"].dispose()


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@dataclass
class ConsoleErrors:
    messages: list[str] = field(default_factory=list)


@pytest.fixture
def console_errors() -> ConsoleErrors:
    return ConsoleErrors()


def new_page(browser: object, console: ConsoleErrors, width: int = 1280, height: int = 800) -> object:
    """Returns a page whose console errors and uncaught exceptions are collected into `console`."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.on("console", lambda msg: msg.type == "error" and console.messages.append(msg.text))
    page.on("pageerror", lambda exc: console.messages.append(f"uncaught: {exc}"))
    page.set_default_timeout(20_000)
    return page


def save_screenshot(page: object, tmp_path: Path, name: str) -> Path:
    """Saves a full-page screenshot to tmp_path and, when TUNEYARD_ARTIFACTS_DIR is set, there too."""
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    artifacts = os.environ.get("TUNEYARD_ARTIFACTS_DIR")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(artifacts) / name)
    return path


def sign_in(page: object, base_url: str, key: str) -> None:
    page.goto(f"{base_url}/")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("heading", name="Runs").wait_for()
