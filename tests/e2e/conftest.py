"""Browser tests: the real API in a uvicorn subprocess on a fresh SQLite database, driven by Debian's
chromium through Playwright. Skipped when chromium or Playwright is missing."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.service import CHROMIUM, CHROMIUM_ARGS, LiveService, prepare_database, start_api, stop


@pytest.fixture(scope="module")
def live_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    """Yields the real API on a migrated SQLite database with one team key."""
    data_dir = tmp_path_factory.mktemp("tuneyard")
    sessions, team_id, key = prepare_database(data_dir)
    process, base_url = start_api(data_dir, data_dir)
    service = LiveService(base_url, key, team_id, data_dir, sessions, [process])
    yield service
    for p in service.processes:
        stop(p)
    sessions.kw["bind"].dispose()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not shutil.which(CHROMIUM):
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def console_errors() -> list[str]:
    """Collects console errors and uncaught exceptions of pages made by `new_page`."""
    return []
