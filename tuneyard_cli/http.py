"""Talking to the service: the client for TUNEYARD_URL and the key, and one-line errors.

The key is `TUNEYARD_API_KEY`, else the key `tuneyard up` saved in its data folder
(`.tuneyard/api-key`, or under `TUNEYARD_DATA_DIR`); the URL is `TUNEYARD_URL`, else the address
`tuneyard up` saved there, else http://127.0.0.1:8000. So in the folder where `tuneyard up` runs,
every client command works in a new shell with nothing exported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
KEY_FILE = "api-key"
URL_FILE = "url"

# What to do about the usual error codes, appended to the API's own message.
HINTS = {
    "dataset_not_found": "give its file with --data NAME=FILE, or upload it (tuneyard datasets upload FILE)",
    "model_not_found": "list the models with `tuneyard models list`",
}


def data_dir() -> Path:
    """Returns the embedded data folder `tuneyard up` uses from here."""
    return Path(os.environ.get("TUNEYARD_DATA_DIR", ".tuneyard"))


def _saved(name: str) -> str | None:
    path = data_dir() / name
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def service_url() -> str:
    return (os.environ.get("TUNEYARD_URL") or _saved(URL_FILE) or DEFAULT_URL).rstrip("/")


def api_key() -> str | None:
    return os.environ.get("TUNEYARD_API_KEY") or _saved(KEY_FILE)


def api_key_expression() -> str:
    """Returns Python that reads the key the way this client found it (for snippets to paste)."""
    if os.environ.get("TUNEYARD_API_KEY") or not _saved(KEY_FILE):
        return 'os.environ["TUNEYARD_API_KEY"]'
    return f'open("{(data_dir() / KEY_FILE).resolve()}").read().strip()'



class ApiError(SystemExit):
    """An error answer, as one line: status, code, message and what to do."""

    def __init__(self, response: httpx.Response) -> None:
        try:
            error = response.json()["error"]
            text = f"{error['code']}: {error['message']}"
            hint = HINTS.get(error["code"])
        except (ValueError, KeyError, TypeError):
            text, hint = response.text[:500], None
        if response.status_code == 401:
            sent_key = response.request.headers.get("Authorization")
            hint = ("the key was not accepted" if sent_key else
                    "set TUNEYARD_API_KEY (`tuneyard keys create --team NAME` makes a key)")
        super().__init__(f"tuneyard: HTTP {response.status_code} {text}" + (f" — {hint}" if hint else ""))


def client(url: str | None = None, key: str | None = None) -> httpx.Client:
    """Returns an HTTP client for the service and key of the environment (or the arguments)."""
    key = key or api_key()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=(url or service_url()).rstrip("/"), headers=headers,
                        timeout=httpx.Timeout(30, read=300))


def checked(response: httpx.Response) -> Any:
    """Returns the JSON body of a successful answer; raises ApiError (one line) otherwise."""
    if response.status_code >= 400:
        raise ApiError(response)
    return response.json()


def unreachable(exc: httpx.TransportError) -> str:
    """Returns the one-line message for a service that does not answer."""
    try:
        url = str(exc.request.url.copy_with(path="/", query=None)).rstrip("/")
    except RuntimeError:  # raised by httpx when the error carries no request
        url = service_url()
    return (f"tuneyard: cannot reach the service at {url} ({type(exc).__name__}) — start it with "
            "`tuneyard up`, or set TUNEYARD_URL to where it runs")
