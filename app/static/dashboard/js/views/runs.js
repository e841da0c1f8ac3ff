// Runs table: status filter, cursor pagination, refreshed while any run on the page is active,
// the final train loss of finished runs, and a selection of runs to compare.

import { api } from "../api.js";
import { errorMessage, fill, h, isTerminal, progressBar, statusBadge } from "../dom.js";
import { elapsedSeconds, formatDate, formatDuration, formatNumber } from "../format.js";

const PAGE_SIZE = 50;
const REFRESH_MS = 5000;
const STATUSES = ["queued", "running", "cancelling", "succeeded", "failed", "cancelled"];

export function stagesSummary(stages = []) {
  return h(
    "ol",
    { class: "stage-chips", "aria-label": "Stages" },
    stages.map((s) =>
      h("li", { class: `stage-chip stage-${s.status}`, title: `stage ${s.index + 1}: ${s.method}, ${s.status}` }, s.method),
    ),
  );
}

/**
 * Returns {stage, step, total_steps, fraction, eta_seconds} of a run. The API gives this object;
 * when it gives only a fraction, step and total come from the stage that is running (or ran last).
 */
export function runProgress(run) {
  if (run.progress && typeof run.progress === "object") return run.progress;
  const stages = run.stages ?? [];
  const stage = stages.find((s) => s.status === "running") ?? stages.findLast((s) => s.status !== "pending");
  return {
    stage: stage?.index ?? null,
    step: stage?.step ?? null,
    total_steps: stage?.total_steps ?? null,
    fraction: typeof run.progress === "number" ? run.progress : null,
    eta_seconds: null,
  };
}

/** The progress cell: bar plus "step / total · ETA". */
export function progressCell(run) {
  const p = runProgress(run);
  const total = p.total_steps;
  const fraction = p.fraction ?? (total ? (p.step ?? 0) / total : run.status === "succeeded" ? 1 : null);
  const parts = [];
  if (p.step != null) parts.push(total ? `${p.step} / ${total}` : `step ${p.step}`);
  if (p.eta_seconds != null && !isTerminal(run.status)) parts.push(`ETA ${formatDuration(p.eta_seconds)}`);
  const text = parts.join(" · ") || (run.status === "queued" ? "waiting" : "—");
  return h("div", { class: "progress-cell" }, progressBar(fraction, `Progress of ${run.name ?? run.id}`), h("span", { class: "muted small" }, text));
}

// Final losses of finished runs never change: fetched once per run and page load.
const finalLosses = new Map();

async function finalLoss(run) {
  if (!finalLosses.has(run.id)) {
    const last = Math.max(0, (run.stages?.length ?? 1) - 1);
    finalLosses.set(
      run.id,
      api(`/v1/runs/${run.id}/metrics`, { query: { names: "loss", split: "train", stage: last, max_points: 2 } })
        .then((page) => page.data[0]?.points.at(-1)?.[1] ?? null)
        .catch(() => null),
    );
  }
  return finalLosses.get(run.id);
}

function finalLossCell(run) {
  const cell = h("td", { class: "cell-final num", dataset: { label: "Final loss" } }, "—");
  if (isTerminal(run.status)) finalLoss(run).then((value) => (cell.textContent = formatNumber(value)));
  return cell;
}

function runRow(run, selected, onSelect) {
  const box = h("input", { type: "checkbox", "aria-label": `Compare ${run.name || run.id}`, checked: selected.has(run.id) });
  box.addEventListener("change", () => onSelect(run.id, box.checked));
  // data-label names each cell for the stacked (card) layout at phone widths.
  return h(
    "tr",
    { dataset: { runId: run.id } },
    h("td", { class: "cell-select" }, box),
    h(
      "td",
      { class: "cell-name", dataset: { label: "Name" } },
      h("a", { href: `#/runs/${run.id}` }, run.name || run.id),
      h("div", { class: "muted small mono" }, run.id),
    ),
    h("td", { class: "cell-status", dataset: { label: "Status" } }, statusBadge(run.status)),
    h("td", { class: "cell-stages", dataset: { label: "Stages" } }, stagesSummary(run.stages)),
    h("td", { class: "cell-progress", dataset: { label: "Progress" } }, progressCell(run)),
    h("td", { class: "cell-created", dataset: { label: "Created" } }, formatDate(run.created_at)),
    h(
      "td",
      { class: "cell-duration", dataset: { label: "Duration" } },
      formatDuration(elapsedSeconds(run.started_at, run.finished_at)),
    ),
    finalLossCell(run),
  );
}

export function renderRuns(view, params) {
  const status = STATUSES.includes(params.get("status")) ? params.get("status") : "";
  const cursors = [null]; // the `after` of each page seen, so "Previous" can go back
  let page = null;
  let timer = null;
  let disposed = false;

  const filter = h(
    "select",
    { id: "status-filter", name: "status" },
    h("option", { value: "" }, "All statuses"),
    STATUSES.map((s) => h("option", { value: s, selected: s === status }, s)),
  );
  filter.addEventListener("change", () => {
    location.hash = filter.value ? `#/runs?status=${filter.value}` : "#/runs";
  });
  const tbody = h("tbody");
  const table = h(
    "table",
    { id: "runs-table", class: "table" },
    h("caption", { class: "visually-hidden" }, "Training runs, newest first"),
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        h("th", { scope: "col", class: "col-select" }, h("span", { class: "visually-hidden" }, "Compare")),
        ["Name", "Status", "Stages", "Progress", "Created", "Duration", "Final loss"].map((t) =>
          h("th", { scope: "col", class: `col-${t.toLowerCase().replace(" ", "-")}` }, t),
        ),
      ),
    ),
    tbody,
  );
  const prev = h("button", { type: "button", id: "runs-prev", disabled: true }, "Previous page");
  const next = h("button", { type: "button", id: "runs-next", disabled: true }, "Next page");
  const pageInfo = h("span", { class: "muted", "aria-live": "polite" });
  const message = h("p", { class: "muted", role: "status" }, "Loading runs…");
  const selected = new Set();
  const compare = h("button", { type: "button", id: "compare-runs", class: "button-primary", disabled: true }, "Compare runs");
  const onSelect = (runId, on) => {
    if (on) selected.add(runId);
    else selected.delete(runId);
    compare.disabled = selected.size < 2;
    compare.textContent = selected.size ? `Compare ${selected.size} runs` : "Compare runs";
  };
  compare.addEventListener("click", () => {
    location.hash = `#/compare?runs=${[...selected].join(",")}`;
  });

  fill(
    view,
    h(
      "div",
      { class: "view-header" },
      h("h1", {}, "Runs"),
      h("div", { class: "field-inline" }, compare, h("label", { for: "status-filter" }, "Status"), filter),
    ),
    message,
    h("div", { class: "table-scroll" }, table),
    h("nav", { class: "pager", "aria-label": "Runs pages" }, prev, pageInfo, next),
  );

  async function load() {
    clearTimeout(timer);
    const after = cursors.at(-1);
    try {
      page = await api("/v1/runs", { query: { limit: PAGE_SIZE, after, status } });
    } catch (err) {
      if (!disposed) message.textContent = `Could not load runs: ${errorMessage(err)}`;
      return;
    }
    if (disposed) return;
    fill(tbody, page.data.map((run) => runRow(run, selected, onSelect)));
    message.textContent = page.data.length ? "" : status ? `No ${status} runs.` : "No runs yet. Submit one with POST /v1/runs.";
    message.hidden = page.data.length > 0;
    prev.disabled = cursors.length <= 1;
    next.disabled = !page.has_more;
    pageInfo.textContent = `Page ${cursors.length}`;
    if (page.data.some((r) => !isTerminal(r.status))) timer = setTimeout(load, REFRESH_MS);
    if (!document.body.dataset.ready) {
      document.body.dataset.ready = "runs";
      performance.mark("tuneyard:runs-interactive");
    }
  }

  next.addEventListener("click", () => {
    if (!page?.next_cursor) return;
    cursors.push(page.next_cursor);
    load();
  });
  prev.addEventListener("click", () => {
    if (cursors.length > 1) cursors.pop();
    load();
  });

  load();
  return () => {
    disposed = true;
    clearTimeout(timer);
  };
}
