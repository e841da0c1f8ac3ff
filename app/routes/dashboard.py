"""The web dashboard: one static page at `/` and `/dashboard`, its assets under `/dashboard/static`.

Plain files, no build step and nothing fetched from a CDN: the page talks to the same `/v1` API
with the key the user enters (kept in the browser's session storage).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

DASHBOARD_DIR = Path(__file__).resolve().parent.parent / "static" / "dashboard"

router = APIRouter(tags=["dashboard"])
router.mount("/dashboard/static", StaticFiles(directory=DASHBOARD_DIR), name="dashboard-static")


@router.get("/", include_in_schema=False)
@router.get("/dashboard", include_in_schema=False)
@router.get("/dashboard/", include_in_schema=False)
def dashboard_page() -> FileResponse:
    """Returns the dashboard's single page; routing inside it happens in the URL fragment."""
    return FileResponse(DASHBOARD_DIR / "index.html", headers={"Cache-Control": "no-cache"})
