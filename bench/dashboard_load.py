"""Time to interactive of the dashboard's runs page with 500 runs in the database.

Seeds a fresh embedded database with 500 runs (mixed statuses, one to three stages), starts the
real API under uvicorn, and loads `/#/runs` in Debian's chromium several times. "Interactive" is
the moment the page marks `tuneyard:runs-interactive`: the first page of runs is rendered and its
filter and pager are wired. Also times one click on "Next page" until the next page is shown.

    python bench/dashboard_load.py [--runs 500] [--loads 5]

Prints the figures; it asserts nothing (benchmarks are not timed tests).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy.orm import Session, sessionmaker  # noqa: E402

from app.db.models import Run, RunStage  # noqa: E402
from app.ids import new_id  # noqa: E402
from tests.e2e.service import CHROMIUM, CHROMIUM_ARGS, prepare_database, start_api, stop  # noqa: E402

STATUSES = ["succeeded", "succeeded", "failed", "cancelled", "running", "queued"]
METHODS = ["sft", "dpo", "grpo"]


def stage_status(run_status: str, *, last: bool) -> str:
    """Returns a stage's status in a run of `run_status`: earlier stages finished, the last one as the run."""
    if run_status == "queued":
        return "pending"
    return run_status if last else "succeeded"


def seed_runs(sessions: sessionmaker[Session], team_id: str, count: int) -> None:
    """Writes `count` runs with stages in plausible states."""
    now = datetime.now(UTC)
    with sessions() as session:
        for i in range(count):
            status = STATUSES[i % len(STATUSES)]
            methods = METHODS[: 1 + i % 3]
            created = now - timedelta(minutes=count - i)
            finished = status in ("succeeded", "failed", "cancelled")
            run = Run(id=new_id("run"), team_id=team_id, name=f"bench-{i:04d}", status=status,
                      base_model="tiny-llama", spec={"name": f"bench-{i:04d}", "stages": []},
                      attempt=0 if status == "queued" else 1, created_at=created,
                      started_at=None if status == "queued" else created + timedelta(seconds=5),
                      finished_at=created + timedelta(minutes=20) if finished else None)
            run.stages = [
                RunStage(index=j, method=m, total_steps=500,
                         status=stage_status(status, last=j == len(methods) - 1),
                         step={"succeeded": 500, "queued": 0}.get(status, (i * 7) % 500))
                for j, m in enumerate(methods)
            ]
            session.add(run)
        session.commit()


BREAKDOWN_JS = """() => {
    const nav = performance.getEntriesByType('navigation')[0];
    const runs = performance.getEntriesByType('resource').find((r) => r.name.includes('/v1/runs'));
    return {dcl: nav.domContentLoadedEventEnd, fetchStart: runs?.startTime, fetchEnd: runs?.responseEnd};
}"""


def measure(base_url: str, key: str, loads: int) -> tuple[list[float], list[float], list[dict], float]:
    """Returns (interactive ms per load, wall ms per load, timing breakdown per load, next-page ms)."""
    from playwright.sync_api import sync_playwright

    marks: list[float] = []
    walls: list[float] = []
    breakdowns: list[dict] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        context.add_init_script(f"sessionStorage.setItem('tuneyard.apiKey', {key!r})")
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        for _ in range(loads):
            page.goto("about:blank")  # a real navigation each time, not a fragment change
            started = time.perf_counter()
            page.goto(f"{base_url}/#/runs")
            page.wait_for_selector("body[data-ready='runs']")
            walls.append((time.perf_counter() - started) * 1000)
            marks.append(page.evaluate(
                "performance.getEntriesByName('tuneyard:runs-interactive')[0].startTime"))
            breakdowns.append(page.evaluate(BREAKDOWN_JS))
            rows = page.locator("#runs-table tbody tr").count()
            if rows == 0:
                raise SystemExit("the runs table rendered no rows")
        first = page.locator("#runs-table tbody tr").first.get_attribute("data-run-id")
        started = time.perf_counter()
        page.get_by_role("button", name="Next page").click()
        page.wait_for_function(
            "id => document.querySelector('#runs-table tbody tr')?.dataset.runId !== id", arg=first)
        next_ms = (time.perf_counter() - started) * 1000
        browser.close()
    if errors:
        print("console errors:", *errors, sep="\n  ")
    return marks, walls, breakdowns, next_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--loads", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tuneyard-bench-") as tmp:
        data_dir = Path(tmp)
        sessions, team_id, key = prepare_database(data_dir, "bench")
        seed_runs(sessions, team_id, args.runs)
        process, base_url = start_api(data_dir, data_dir)
        try:
            marks, walls, breakdowns, next_ms = measure(base_url, key, args.loads)
        finally:
            stop(process)
            sessions.kw["bind"].dispose()
    print(f"runs in database: {args.runs}; page size 50; {args.loads} loads of /#/runs in chromium")
    print("time to interactive (navigation start -> first page rendered), ms: "
          + ", ".join(f"{m:.0f}" for m in marks))
    median = statistics.median(marks)
    print(f"  first (cold) {marks[0]:.0f} ms, median {median:.0f} ms, max {max(marks):.0f} ms")
    print(f"wall time of page.goto until ready, median: {statistics.median(walls):.0f} ms")
    for i, b in enumerate(breakdowns):
        print(f"  load {i + 1}: DOMContentLoaded {b['dcl']:.0f} ms, GET /v1/runs?limit=50 "
              f"{b['fetchStart']:.0f}-{b['fetchEnd']:.0f} ms, rendered {marks[i]:.0f} ms")
    print(f"'Next page' click until page 2 shown: {next_ms:.0f} ms")


if __name__ == "__main__":
    main()
