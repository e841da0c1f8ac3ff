// One run: header with actions, stage timeline, live charts (one stage or the whole run), its
// config, events, exports and resume checkpoints.
// Live data comes from the SSE stream; if the stream cannot be kept open, the page polls.

import { api } from "../api.js";
import { ChartView, MetricChart } from "../charts.js";
import { errorMessage, fill, h, isTerminal, notify, statusBadge } from "../dom.js";
import { elapsedSeconds, formatDate, formatDuration } from "../format.js";
import { CHART_SPECS, MetricStore, toPoints } from "../metrics.js";
import { openStream } from "../stream.js";
import { progressCell, runProgress } from "./runs.js";
import { EventsLog, checkpointsTables, specView, stageTimeline } from "./run-parts.js";

const POLL_MS = 2000;
const CANCELLABLE = new Set(["queued", "running"]);
const RESUMABLE = new Set(["failed", "cancelled"]);

export function renderRun(view, runId) {
  const base = `/v1/runs/${encodeURIComponent(runId)}`;
  const store = new MetricStore();
  const events = new EventsLog();
  const chartView = new ChartView();
  const charts = new Map(CHART_SPECS.map((spec) => [spec.id, new MetricChart(spec, chartView)]));
  let run = null;
  let stage = null; // the stage whose charts are shown, or "all" for the whole run
  let followStage = true; // follow the running stage until the user picks one
  let stream = null;
  let timers = [];
  let drawPending = false;
  let disposed = false;

  const header = h("div", { class: "view-header" });
  const summary = h("dl", { class: "summary" });
  const timeline = h("section", { "aria-labelledby": "timeline-title" });
  const stagePicker = h("div", { class: "stage-picker", role: "group", "aria-label": "Stage shown in the charts" });
  const chartGrid = h("div", { class: "charts" }, [...charts.values()].map((c) => c.element));
  const liveState = h("span", { class: "live muted small", id: "live-state", "aria-live": "polite" });
  const checkpointsBox = h("div", {}, h("p", { class: "muted" }, "Loading checkpoints…"));
  const configBox = h("section", { "aria-labelledby": "config-title" });
  const cancel = h("button", { type: "button", id: "cancel-run", class: "button-danger" }, "Cancel run");
  const resume = h("button", { type: "button", id: "resume-run" }, "Resume run");

  fill(
    view,
    h("p", { class: "breadcrumb" }, h("a", { href: "#/runs" }, "← All runs")),
    header,
    summary,
    timeline,
    h(
      "section",
      { "aria-labelledby": "charts-title" },
      h("div", { class: "section-head" }, h("h2", { id: "charts-title" }, "Metrics"), liveState),
      h("div", { class: "chart-toolbar" }, stagePicker, chartView.controls()),
      chartGrid,
    ),
    configBox,
    events.element,
    h("section", { "aria-labelledby": "checkpoints-title" }, h("h2", { id: "checkpoints-title" }, "Checkpoints"), checkpointsBox),
  );

  function renderRunInfo() {
    fill(
      header,
      h("h1", {}, run.name || run.id, " ", statusBadge(run.status)),
      h("div", { class: "actions" }, cancel, resume),
    );
    // Only the actions that apply now are shown: a finished run offers no "Cancel run".
    cancel.hidden = !CANCELLABLE.has(run.status);
    resume.hidden = !RESUMABLE.has(run.status);
    cancel.disabled = false;
    resume.disabled = false;
    const error = run.error ? `${run.error.code ?? run.error.type ?? "error"}: ${run.error.message ?? ""}` : null;
    fill(
      summary,
      [
        ["ID", h("span", { class: "mono" }, run.id)],
        ["Base model", run.base_model],
        ["Progress", progressCell(run)],
        ["Created", formatDate(run.created_at)],
        ["Duration", formatDuration(elapsedSeconds(run.started_at, run.finished_at))],
        ["Attempt", String(run.attempt ?? "—")],
        error && ["Error", h("span", { class: "form-error" }, error)],
      ]
        .filter(Boolean)
        .map(([term, value]) => h("div", {}, h("dt", {}, term), h("dd", {}, value))),
    );
    fill(timeline, h("h2", { id: "timeline-title" }, "Stages"), stageTimeline(run.stages));
    if (!configBox.firstChild) fill(configBox, specView(run.spec));
    if (followStage) stage = currentStage();
    renderStagePicker();
    scheduleDraw();
  }

  function currentStage() {
    const progress = runProgress(run);
    if (progress.stage != null) return progress.stage;
    const active = run.stages?.find((s) => s.status === "running") ?? run.stages?.findLast((s) => s.status !== "pending");
    return active?.index ?? 0;
  }

  function renderStagePicker() {
    const stages = run.stages ?? [];
    stagePicker.hidden = stages.length < 2;
    const choices = [...stages.map((s) => [s.index, `Stage ${s.index + 1} · ${s.method}`]), ["all", "Whole run"]];
    fill(
      stagePicker,
      choices.map(([value, label]) => {
        const button = h("button", { type: "button", class: "chip", "aria-pressed": String(value === stage) }, label);
        button.addEventListener("click", () => {
          followStage = false;
          stage = value;
          renderStagePicker();
          scheduleDraw();
        });
        return button;
      }),
    );
  }

  function scheduleDraw() {
    if (drawPending) return;
    drawPending = true;
    requestAnimationFrame(() => {
      drawPending = false;
      if (disposed || stage == null) return;
      const offsets = store.stageOffsets(run.stages);
      for (const spec of CHART_SPECS) {
        const { steps, series } = store.chartData(spec, stage, offsets);
        const chart = charts.get(spec.id);
        chart.element.hidden = spec.id !== "loss" && steps.length === 0;
        if (!chart.element.hidden) chart.update(steps, series);
      }
    });
  }

  function addMetrics(payload) {
    if (store.add(toPoints(payload)) > 0) scheduleDraw();
  }

  function setRun(next) {
    const wasLive = !isTerminal(run.status);
    run = { ...run, ...next };
    renderRunInfo();
    if (wasLive && isTerminal(run.status)) {
      stopLive();
      refreshCheckpoints(); // the final save and the exports land as the run ends
    }
  }

  async function refreshRun() {
    try {
      setRun(await api(base));
    } catch (err) {
      if (err.status === 404) notify("This run no longer exists.", "error");
    }
  }

  async function refreshCheckpoints() {
    try {
      const page = await api(`${base}/checkpoints`, { query: { limit: 100 } });
      fill(checkpointsBox, checkpointsTables(page.data));
    } catch (err) {
      fill(checkpointsBox, h("p", { class: "form-error" }, `Could not load checkpoints: ${errorMessage(err)}`));
    }
  }

  async function loadEvents(after) {
    const page = await api(`${base}/events`, { query: { limit: 100, after } });
    onEvents(page.data);
  }

  // The stream sends `metrics` (one row), `event` (one event) and `status` (the whole run object,
  // whenever its status or a stage's step changes), each with a replay cursor as its id.
  function onStreamMessage({ event, data }) {
    if (event === "metrics") addMetrics(data);
    else if (event === "event") onEvents([data]);
    else if (event === "status") setRun(data);
    return isTerminal(run.status) ? "close" : undefined;
  }

  function onEvents(list) {
    events.add(list);
    if (list.some((e) => e.kind?.startsWith("checkpoint"))) refreshCheckpoints();
  }

  function startLive() {
    liveState.textContent = "Connecting…";
    stream = openStream(`${base}/stream`, {
      onOpen: () => (liveState.textContent = "● Live"),
      onMessage: onStreamMessage,
      onFallback: () => {
        if (!disposed && !isTerminal(run.status)) startPolling();
      },
    });
  }

  function startPolling() {
    liveState.textContent = "Polling (stream unavailable)";
    every(POLL_MS, async () => {
      await refreshRun();
      const current = runProgress(run).stage ?? 0;
      const after = store.lastStep(current);
      addMetrics(await api(`${base}/metrics`, { query: { stage: current, after_step: after ?? undefined } }));
      await loadEvents(events.lastId ?? undefined);
    });
  }

  function every(ms, task) {
    const tick = async () => {
      if (disposed) return;
      try {
        await task();
      } catch {
        // a missed refresh is retried on the next tick
      }
      if (!disposed && !isTerminal(run.status)) timers.push(setTimeout(tick, ms));
    };
    timers.push(setTimeout(tick, ms));
  }

  function stopLive() {
    stream?.close();
    stream = null;
    timers.forEach(clearTimeout);
    timers = [];
    liveState.textContent = `Finished (${run.status})`;
  }

  async function act(action, button) {
    button.disabled = true;
    try {
      const wasLive = !isTerminal(run.status);
      setRun(await api(`${base}/${action}`, { method: "POST" }));
      notify(action === "cancel" ? "Cancellation requested." : "Run resumed.");
      if (!wasLive && !isTerminal(run.status)) startLive();
    } catch (err) {
      notify(`Could not ${action} the run: ${errorMessage(err)}`, "error");
      renderRunInfo();
    }
  }

  cancel.addEventListener("click", () => {
    if (window.confirm(`Cancel run ${run.name || run.id}? It saves a checkpoint and stops.`)) act("cancel", cancel);
  });
  resume.addEventListener("click", () => act("resume", resume));

  (async () => {
    try {
      run = await api(base);
    } catch (err) {
      fill(view, h("p", { class: "breadcrumb" }, h("a", { href: "#/runs" }, "← All runs")), h("p", { class: "form-error", role: "alert" }, `Could not load run ${runId}: ${errorMessage(err)}`));
      return;
    }
    renderRunInfo();
    await Promise.allSettled([
      api(`${base}/metrics`).then(addMetrics),
      loadEvents(),
      refreshCheckpoints(),
    ]);
    if (disposed) return;
    if (isTerminal(run.status)) liveState.textContent = `Finished (${run.status})`;
    else startLive();
  })();

  return () => {
    disposed = true;
    stream?.close();
    timers.forEach(clearTimeout);
    charts.forEach((c) => c.destroy());
  };
}
