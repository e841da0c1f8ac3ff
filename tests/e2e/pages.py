"""Page helpers of the browser tests: a page that records console errors, sign-in, screenshots."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any


def new_page(browser: Any, console_errors: list[str], width: int = 1280, height: int = 800) -> Any:
    """Returns a page in a fresh context whose console errors land in `console_errors`."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()

    def on_console(msg: Any) -> None:
        if msg.type == "error":
            console_errors.append(f"{msg.text} at {msg.location.get('url')}")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: console_errors.append(f"uncaught: {exc}"))
    page.set_default_timeout(20_000)
    return page


def save_screenshot(page: Any, tmp_path: Path, name: str) -> Path:
    """Saves a full-page screenshot to tmp_path and, when TUNEYARD_ARTIFACTS_DIR is set, there too."""
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    artifacts = os.environ.get("TUNEYARD_ARTIFACTS_DIR")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(artifacts) / name)
    return path


def sign_in(page: Any, base_url: str, key: str) -> None:
    page.goto(f"{base_url}/")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("heading", name="Runs").wait_for()
