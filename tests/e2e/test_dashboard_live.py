"""End to end: the real API and a real worker on one SQLite database train an SFT run on the tiny
model; chromium watches its loss chart grow through the dashboard, cancels it and sees `cancelled`."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.pages import new_page, save_screenshot, sign_in
from tests.e2e.service import LiveService, prepare_database, start_api, start_worker, stop

pytestmark = [pytest.mark.browser, pytest.mark.slow]

RUN_SPEC = {
    "name": "live-sft",
    "base_model": "tiny-llama",
    "seed": 3,
    "stages": [{
        "method": "sft", "datasets": [], "max_steps": 5000, "batch_size": 2, "max_seq_len": 64,
        "learning_rate": 1e-3, "eval_fraction": 0.1, "eval_every_steps": 10, "packing": False,
    }],
    "checkpoint_every_steps": 25,
    "keep_checkpoints": 2,
}


def chats(count: int = 64) -> bytes:
    """Returns an SFT dataset of short arithmetic conversations as JSONL."""
    lines = []
    for i in range(count):
        a, b = i % 9, (i * 7) % 11
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
        ]}))
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="module")
def live_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[LiveService]:
    """Yields the API and a training worker on one embedded data folder with the tiny base model."""
    data_dir = tmp_path_factory.mktemp("tuneyard-live")
    shutil.copytree(tiny_model_dir, data_dir / "models" / "tiny-llama")
    sessions, team_id, key = prepare_database(data_dir)
    api, base_url = start_api(data_dir, data_dir)
    service = LiveService(base_url, key, team_id, data_dir, sessions, [api])
    try:
        service.processes.append(start_worker(data_dir, data_dir))
        yield service
    finally:
        for process in service.processes:
            stop(process)
        sessions.kw["bind"].dispose()


def submit_run(client: httpx.Client) -> str:
    """Uploads the dataset, waits for it to validate, submits the run; returns the run id."""
    response = client.post("/v1/datasets", content=chats(), params={"format": "sft", "name": "sums.jsonl"},
                           headers={"Content-Type": "application/jsonl"})
    assert response.status_code == 201, response.text
    dataset_id = response.json()["id"]
    deadline = time.monotonic() + 120
    while (dataset := client.get(f"/v1/datasets/{dataset_id}").json())["status"] == "validating":
        assert time.monotonic() < deadline, "dataset still validating after 120 s"
        time.sleep(0.3)
    assert dataset["status"] == "ready", dataset
    spec = json.loads(json.dumps(RUN_SPEC))
    spec["stages"][0]["datasets"] = [{"id": dataset_id}]
    response = client.post("/v1/runs", json=spec)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def loss_points(page: Any) -> int:
    return int(page.locator("#chart-loss").get_attribute("data-points") or 0)


def wait_for_more_points(page: Any, than: int, timeout: float) -> None:
    page.wait_for_function(
        "n => Number(document.querySelector('#chart-loss')?.dataset.points) > n", arg=than, timeout=timeout)


def test_watch_a_real_run_train_then_cancel_it(
    live_stack: LiveService, browser: Any, console_errors: list[str], tmp_path: Path
) -> None:
    with live_stack.client() as client:
        run_id = submit_run(client)
    page = new_page(browser, console_errors)
    sign_in(page, live_stack.base_url, live_stack.key)

    row = page.locator(f"#runs-table tr[data-run-id='{run_id}']")
    row.locator(".badge", has_text="running").wait_for(timeout=180_000)  # worker start and model load
    row.get_by_role("link", name="live-sft").click()

    wait_for_more_points(page, 2, timeout=120_000)
    seen = loss_points(page)
    wait_for_more_points(page, seen, timeout=60_000)
    assert page.locator("#live-state").inner_text() == "● Live"  # updates came over the SSE stream

    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Cancel run").click()
    page.locator("h1 .badge", has_text="cancelled").wait_for(timeout=90_000)
    assert page.get_by_role("button", name="Resume run").is_enabled()
    page.get_by_text("Finished (cancelled)").wait_for()
    save_screenshot(page, tmp_path, "dashboard-live-run-cancelled.png")

    # Downloads carry the key (fetch + blob URL): one file of the checkpoint saved at cancel.
    checkpoint = page.locator("#checkpoints-table tbody tr").first
    checkpoint.locator("summary", has_text="Files").click()
    first_file = checkpoint.locator(".files li").first
    file_path = first_file.locator(".mono").inner_text()
    with page.expect_download() as download:
        first_file.get_by_role("button", name="Download").click()
    saved = tmp_path / "downloaded"
    download.value.save_as(saved)
    with live_stack.client() as client:
        ckpt_id = checkpoint.get_attribute("data-checkpoint-id")
        files = {f["path"]: f["size"] for f in client.get(f"/v1/checkpoints/{ckpt_id}").json()["files"]}
    assert saved.stat().st_size == files[file_path]

    # Resume continues from the checkpoint: the page goes live again and the chart grows past it.
    at_cancel = loss_points(page)
    page.get_by_role("button", name="Resume run").click()
    page.locator("h1 .badge", has_text="running").wait_for(timeout=120_000)
    wait_for_more_points(page, at_cancel, timeout=120_000)
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Cancel run").click()
    page.locator("h1 .badge", has_text="cancelled").wait_for(timeout=90_000)

    page.set_viewport_size({"width": 390, "height": 844})
    page.reload()
    page.locator("h1 .badge", has_text="cancelled").wait_for()
    wait_for_more_points(page, 0, timeout=20_000)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    save_screenshot(page, tmp_path, "dashboard-live-run-phone.png")

    assert console_errors == []
