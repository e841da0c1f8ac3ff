"""The dashboard in chromium against the real API, with rows written into the database as the
worker writes them (the end-to-end version with a real worker is test_dashboard_live.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.conftest import write_model_folder
from tests.e2e import seed
from tests.e2e.pages import new_page, save_screenshot, sign_in
from tests.e2e.service import LiveService

pytestmark = pytest.mark.browser


def test_seeded_run_page_follows_new_metrics_and_cancels(
    live_service: LiveService, browser: Any, console_errors: list[str], tmp_path: Path
) -> None:
    run_id = seed.seed_running_run(live_service.sessions, live_service.team_id, "sft-seeded")
    seed.add_train_steps(live_service.sessions, run_id, 1, 20)
    page = new_page(browser, console_errors)

    sign_in(page, live_service.base_url, live_service.key)
    row = page.locator(f"#runs-table tr[data-run-id='{run_id}']")
    assert row.locator(".badge").inner_text() == "running"
    assert "20 / 200" in row.inner_text()

    row.get_by_role("link", name="sft-seeded").click()
    page.wait_for_function("document.querySelector('#chart-loss')?.dataset.points === '20'")
    # Train and eval loss share one chart (eval rows at steps 10 and 20).
    assert page.locator("#chart-loss").get_attribute("data-series") == "2"
    assert page.locator("#chart-lr").is_visible()
    assert page.locator("#chart-reward").is_hidden()  # SFT reports no reward

    seed.add_train_steps(live_service.sessions, run_id, 21, 45)
    page.wait_for_function("Number(document.querySelector('#chart-loss').dataset.points) >= 45")
    page.get_by_text("stage 1 (sft) started").wait_for()

    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Cancel run").click()
    # No worker runs this seeded run, so it stays `cancelling` (the live test sees `cancelled`).
    page.locator("h1 .badge", has_text="cancelling").wait_for()
    assert page.get_by_role("button", name="Cancel run").is_hidden()  # only actions that apply are shown
    save_screenshot(page, tmp_path, "dashboard-seeded-run.png")

    page.set_viewport_size({"width": 390, "height": 844})
    page.reload()
    page.wait_for_function("Number(document.querySelector('#chart-loss')?.dataset.points) >= 45")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    save_screenshot(page, tmp_path, "dashboard-seeded-run-phone.png")
    assert console_errors == []


def test_runs_table_filters_by_status(
    live_service: LiveService, browser: Any, console_errors: list[str]
) -> None:
    failed_id = seed.seed_running_run(live_service.sessions, live_service.team_id, "will-fail")
    seed.finish_run(live_service.sessions, failed_id, "failed")
    page = new_page(browser, console_errors)
    sign_in(page, live_service.base_url, live_service.key)

    page.get_by_label("Status").select_option("failed")
    page.wait_for_url("**/#/runs?status=failed")
    page.locator(f"#runs-table tr[data-run-id='{failed_id}']").wait_for()
    assert set(page.locator("#runs-table tbody .badge").all_inner_texts()) == {"failed"}
    page.get_by_label("Status").select_option("queued")
    page.get_by_text("No queued runs.").wait_for()
    assert console_errors == []


def test_run_page_polls_when_the_stream_is_unavailable(
    live_service: LiveService, browser: Any, tmp_path: Path
) -> None:
    run_id = seed.seed_running_run(live_service.sessions, live_service.team_id, "no-stream")
    seed.add_train_steps(live_service.sessions, run_id, 1, 5)
    page = new_page(browser, [])  # the refused stream requests are logged as console errors here
    page.route("**/stream", lambda route: route.fulfill(
        status=503, content_type="application/json",
        body='{"error": {"type": "unavailable", "code": "busy", "message": "try later", "param": null}}'))
    sign_in(page, live_service.base_url, live_service.key)
    page.goto(f"{live_service.base_url}/#/runs/{run_id}")
    page.get_by_text("Polling (stream unavailable)").wait_for(timeout=30_000)

    seed.add_train_steps(live_service.sessions, run_id, 6, 12)
    page.wait_for_function("document.querySelector('#chart-loss').dataset.points === '12'")


def test_stream_reconnects_with_last_event_id(live_service: LiveService, browser: Any) -> None:
    run_id = seed.seed_running_run(live_service.sessions, live_service.team_id, "reconnects")
    page = new_page(browser, [])
    requests: list[dict[str, str]] = []

    def first_cut_short(route: Any) -> None:
        requests.append(route.request.headers)
        if len(requests) == 1:  # one message, then the connection ends
            body = ('retry: 100\n\nid: m999-e999\nevent: metrics\ndata: {"stage_index": 0, "step": 1, '
                    '"split": "train", "values": {"loss": 2.5}}\n\n')
            route.fulfill(status=200, content_type="text/event-stream", body=body)
        else:
            route.continue_()

    page.route("**/stream", first_cut_short)
    sign_in(page, live_service.base_url, live_service.key)
    page.goto(f"{live_service.base_url}/#/runs/{run_id}")
    page.wait_for_function("document.querySelector('#chart-loss')?.dataset.points === '1'")
    page.wait_for_function("document.querySelector('#live-state').textContent === '● Live'")
    page.wait_for_timeout(500)
    assert len(requests) >= 2
    assert "last-event-id" not in requests[0]
    assert requests[1]["last-event-id"] == "m999-e999"
    assert requests[1]["authorization"] == f"Bearer {live_service.key}"


def test_datasets_page_shows_validation_errors_with_line_numbers(
    live_service: LiveService, browser: Any, console_errors: list[str], tmp_path: Path
) -> None:
    dataset_id = seed.seed_invalid_dataset(live_service.sessions, live_service.team_id)
    page = new_page(browser, console_errors)
    sign_in(page, live_service.base_url, live_service.key)

    page.get_by_role("link", name="Datasets").click()
    row = page.locator(f"#datasets-table tr[data-dataset-id='{dataset_id}']")
    assert row.locator(".badge").inner_text() == "invalid"
    row.get_by_role("link").click()
    errors = page.locator("#dataset-errors tbody tr")
    errors.first.wait_for()
    assert [errors.nth(i).locator("td").first.inner_text() for i in range(errors.count())] == ["7", "19"]
    assert "role must be user, assistant or system" in errors.first.inner_text()
    save_screenshot(page, tmp_path, "dashboard-dataset.png")
    assert console_errors == []


def test_eval_results_are_shown_side_by_side(
    live_service: LiveService, browser: Any, console_errors: list[str], tmp_path: Path
) -> None:
    dataset_id = seed.seed_invalid_dataset(live_service.sessions, live_service.team_id)
    eval_id = seed.seed_finished_eval(live_service.sessions, live_service.team_id, dataset_id)
    page = new_page(browser, console_errors)
    sign_in(page, live_service.base_url, live_service.key)

    page.get_by_role("link", name="Evals").click()
    page.get_by_role("link", name="base-vs-sft").click()
    table = page.locator("#eval-results")
    table.wait_for()
    headers = table.locator("thead th").all_text_contents()
    assert headers == ["Metric", "base", "ckpt_seeded"]
    loss_row = table.locator("tbody tr", has_text="loss")
    assert loss_row.locator("td").all_inner_texts() == ["2.310", "1.420"]
    assert page.locator("#eval-samples tbody tr").first.locator("td").all_inner_texts() == ["2+2=", "5", "4"]
    assert eval_id in page.url
    save_screenshot(page, tmp_path, "dashboard-eval.png")
    assert console_errors == []


def test_wrong_key_is_refused_and_the_key_lives_in_session_storage(
    live_service: LiveService, browser: Any
) -> None:
    page = new_page(browser, [])
    page.goto(f"{live_service.base_url}/dashboard")
    page.get_by_label("API key").fill("ty_not-a-key")
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("alert").filter(has_text="not accepted").wait_for()
    assert page.evaluate("sessionStorage.getItem('tuneyard.apiKey')") is None

    page.get_by_label("API key").fill(live_service.key)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("heading", name="Runs").wait_for()
    assert page.evaluate("sessionStorage.getItem('tuneyard.apiKey')") == live_service.key
    page.get_by_role("button", name="Sign out").click()
    page.get_by_label("API key").wait_for()


STREAM_TEXT = (
    ": keep-alive\r\nid: 7\r\nevent: metrics\r\ndata: {\"step\":\r\ndata: 1}\r\n\r\n"
    "id: 8\nevent: status\ndata: {\"status\":\"cancelled\"}\n\nretry: 500\n\n"
)


def test_event_stream_parser_handles_any_chunking(live_service: LiveService, browser: Any) -> None:
    page = new_page(browser, [])
    page.goto(f"{live_service.base_url}/dashboard")
    results = page.evaluate(
        """async (text) => {
            const { EventStreamParser } = await import('/dashboard/static/js/stream.js');
            const results = [];
            for (let size = 1; size <= 9; size += 1) {
                const out = [];
                const parser = new EventStreamParser((m) => out.push(m));
                for (let i = 0; i < text.length; i += size) parser.push(text.slice(i, i + size));
                results.push({ out, retry: parser.retryMs });
            }
            return results;
        }""",
        STREAM_TEXT,
    )
    for result in results:
        assert result["out"] == [
            {"event": "metrics", "data": '{"step":\n1}', "id": "7"},
            {"event": "status", "data": '{"status":"cancelled"}', "id": "8"},
        ]
        assert result["retry"] == 500


def test_two_finished_runs_compare_on_one_chart_with_their_config_difference(
    live_service: LiveService, browser: Any, console_errors: list[str], tmp_path: Path
) -> None:
    fast = seed.seed_finished_run(live_service.sessions, live_service.team_id, "lr-1e-3", learning_rate=1e-3,
                                  scale=3.0)
    slow = seed.seed_finished_run(live_service.sessions, live_service.team_id, "lr-1e-4", learning_rate=1e-4,
                                  scale=4.5)
    page = new_page(browser, console_errors)
    sign_in(page, live_service.base_url, live_service.key)
    for run_id, scale in ((fast, 3.0), (slow, 4.5)):
        row = page.locator(f"#runs-table tr[data-run-id='{run_id}']")
        row.get_by_role("checkbox").check()
        # The final train loss of each finished run is a column of the table.
        final = row.locator(".cell-final", has_text=f"{seed.train_loss(30, scale):.3f}")
        final.wait_for()
    page.get_by_role("button", name="Compare 2 runs").click()

    page.wait_for_function("document.querySelector('#chart-compare-train-loss')?.dataset.series === '2'")
    chart = page.locator("#chart-compare-train-loss")
    assert chart.get_attribute("data-points") == "30"
    legend = chart.locator(".u-legend .u-series .u-label").all_inner_texts()
    assert legend == ["step", "lr-1e-3", "lr-1e-4"]
    diff = page.locator("#config-diff")
    rows = diff.locator("tbody tr")
    paths = [rows.nth(i).get_attribute("data-path") for i in range(rows.count())]
    assert "stages[0].learning_rate" in paths and "name" in paths
    assert diff.locator("tr[data-path='stages[0].learning_rate'] td").all_inner_texts() == ["0.001", "0.0001"]
    assert "base_model" not in paths  # equal fields are not listed
    save_screenshot(page, tmp_path, "dashboard-compare.png")
    assert console_errors == []


def test_hovering_a_chart_reads_the_value_at_that_step(
    live_service: LiveService, browser: Any, console_errors: list[str], tmp_path: Path
) -> None:
    run_id = seed.seed_finished_run(live_service.sessions, live_service.team_id, "hover", learning_rate=2e-4,
                                    scale=3.0, steps=40)
    page = new_page(browser, console_errors)
    sign_in(page, live_service.base_url, live_service.key)
    page.goto(f"{live_service.base_url}/#/runs/{run_id}")
    page.wait_for_function("document.querySelector('#chart-loss')?.dataset.points === '40'")
    over = page.locator("#chart-loss .u-over")
    box = over.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
    values = page.locator("#chart-loss .u-legend .u-series .u-value")
    page.wait_for_function("/^[0-9]+$/.test(document.querySelector('#chart-loss .u-value').textContent)")
    step = int(values.nth(0).inner_text())
    assert 1 <= step <= 40
    # The legend shows the hovered step's train loss (4 significant digits, as the dashboard prints).
    assert values.nth(1).inner_text() == f"{seed.train_loss(step):.3f}"

    # Smoothing and log scale redraw the same points.
    page.locator("#chart-log").check()
    page.locator("#chart-smoothing").fill("0.9")
    page.wait_for_function("document.querySelector('#chart-loss').dataset.points === '40'")
    # A finished run offers no cancel, its exports are apart from resume checkpoints, and its config is shown.
    assert page.get_by_role("button", name="Cancel run").is_hidden()
    assert page.locator("#exports-table tbody tr").count() == 2
    assert page.locator("#checkpoints-table tbody tr").count() == 1
    page.locator("#run-spec summary").click()
    assert '"learning_rate": 0.0002' in page.locator("#run-spec pre").inner_text()
    save_screenshot(page, tmp_path, "dashboard-hover.png")

    page.set_viewport_size({"width": 367, "height": 800})
    page.reload()
    page.locator("#exports-table").wait_for()
    page.wait_for_function("document.querySelector('#chart-loss')?.dataset.points === '40'")
    assert page.evaluate("document.documentElement.scrollWidth") <= 367
    save_screenshot(page, tmp_path, "dashboard-finished-run-phone.png")
    assert console_errors == []


def test_a_dataset_is_uploaded_and_an_eval_started_from_the_pages(
    live_service: LiveService, browser: Any, console_errors: list[str], tmp_path: Path
) -> None:
    model = live_service.data_dir / "models" / "tiny-llama"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text('{"model_type": "llama"}')
    ready = seed.seed_ready_dataset(live_service.sessions, live_service.team_id)
    upload = tmp_path / "sums.jsonl"
    upload.write_text('{"prompt": "2+2=", "completion": "4"}\n' * 3)
    page = new_page(browser, console_errors)
    sign_in(page, live_service.base_url, live_service.key)

    page.get_by_role("link", name="Datasets").click()
    page.locator("#upload-file").set_input_files(str(upload))
    page.locator("#upload-format").select_option("sft")
    page.get_by_role("button", name="Upload").click()
    page.get_by_role("heading", name="sums.jsonl").wait_for()  # the new dataset's page (no worker here)
    assert "/#/datasets/ds_" in page.url

    page.get_by_role("link", name="Evals").click()
    page.locator("#eval-models option[value='tiny-llama']").wait_for(state="attached")
    page.locator("#eval-models").select_option("tiny-llama")
    page.locator("#eval-dataset").select_option(ready)
    page.get_by_role("button", name="Start eval").click()
    page.wait_for_url("**/#/evals/eval_*")
    page.locator("h1 .badge", has_text="queued").wait_for()
    save_screenshot(page, tmp_path, "dashboard-eval-started.png")
    assert console_errors == []


def test_a_fine_tuning_job_is_listed_as_its_run(
    live_service: LiveService, browser: Any, console_errors: list[str]
) -> None:
    write_model_folder(live_service.data_dir / "models" / "tiny-ft")  # loadable as far as submit checks
    file_id = seed.seed_ready_dataset(live_service.sessions, live_service.team_id)
    response = httpx.post(f"{live_service.base_url}/v1/fine_tuning/jobs",
                          headers={"Authorization": f"Bearer {live_service.key}"},
                          json={"model": "tiny-ft", "training_file": file_id, "suffix": "faq"})
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "queued" and job["run_id"], job
    page = new_page(browser, console_errors)
    sign_in(page, live_service.base_url, live_service.key)
    row = page.locator(f"#runs-table tr[data-run-id='{job['run_id']}']")
    assert row.locator(".badge").inner_text() == "queued"
    row.get_by_role("link", name=job["id"]).click()
    page.locator("h1", has_text=job["id"]).wait_for()
    assert console_errors == []
