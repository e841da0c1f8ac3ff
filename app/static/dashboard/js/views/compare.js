// Two or more runs side by side: their curves overlaid on one chart per metric (whole-run steps,
// stages one after the other) and the config fields in which their specs differ.

import { api } from "../api.js";
import { COLORS, ChartView, MetricChart } from "../charts.js";
import { errorMessage, fill, h, statusBadge } from "../dom.js";
import { MetricStore, toPoints } from "../metrics.js";

const COMPARE_CHARTS = [
  { id: "compare-train-loss", title: "Train loss", yLabel: "loss", pick: "first", sources: [["train", "loss"], ["train", "loss/total"]] },
  {
    id: "compare-eval-loss",
    title: "Eval loss",
    yLabel: "loss",
    pick: "first",
    sources: [["eval", "loss"], ["eval", "eval_loss"], ["train", "eval_loss"]],
  },
  { id: "compare-reward", title: "Reward", yLabel: "reward", pick: "first", sources: [["train", "reward"], ["train", "objective/scores"]] },
  { id: "compare-dpo-margin", title: "DPO reward margin", yLabel: "margin", pick: "first", sources: [["train", "rewards/margins"]] },
];

/** Returns {"stages[0].learning_rate": 0.001, ...}: every leaf of a spec by its field path. */
export function flatten(value, path = "", out = {}) {
  if (Array.isArray(value)) {
    if (!value.length) out[path] = [];
    value.forEach((item, i) => flatten(item, `${path}[${i}]`, out));
  } else if (value && typeof value === "object") {
    const entries = Object.entries(value);
    if (!entries.length) out[path] = {};
    for (const [key, item] of entries) flatten(item, path ? `${path}.${key}` : key, out);
  } else {
    out[path] = value;
  }
  return out;
}

/** Returns [[path, [value per spec]]] for the paths whose values are not all equal. */
export function configDiff(specs) {
  const flat = specs.map((spec) => flatten(spec));
  const paths = [...new Set(flat.flatMap((f) => Object.keys(f)))].sort();
  return paths
    .map((path) => [path, flat.map((f) => f[path])])
    .filter(([, values]) => new Set(values.map((v) => JSON.stringify(v ?? null))).size > 1);
}

function diffTable(runs) {
  const rows = configDiff(runs.map((r) => r.spec));
  if (!rows.length) return h("p", { class: "muted", id: "config-diff-empty" }, "The configs are identical.");
  const show = (v) => (v === undefined ? "—" : typeof v === "object" ? JSON.stringify(v) : String(v));
  return h(
    "div",
    { class: "table-scroll" },
    h(
      "table",
      { class: "table", id: "config-diff" },
      h("caption", { class: "visually-hidden" }, "Config fields that differ"),
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Field"), runs.map((r) => h("th", { scope: "col" }, r.name || r.id)))),
      h(
        "tbody",
        {},
        rows.map(([path, values]) =>
          h("tr", { dataset: { path } }, h("th", { scope: "row", class: "mono small" }, path), values.map((v) => h("td", { class: "mono small" }, show(v)))),
        ),
      ),
    ),
  );
}

export function renderCompare(view, params) {
  const ids = (params.get("runs") ?? "").split(",").filter(Boolean);
  const chartView = new ChartView();
  const charts = COMPARE_CHARTS.map((spec) => new MetricChart(spec, chartView));
  let disposed = false;
  const legend = h("ul", { class: "compare-runs" });
  const diffBox = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  fill(
    view,
    h("p", { class: "breadcrumb" }, h("a", { href: "#/runs" }, "← All runs")),
    h("div", { class: "view-header" }, h("h1", {}, `Compare ${ids.length} runs`)),
    legend,
    h(
      "section",
      { "aria-labelledby": "compare-charts-title" },
      h("div", { class: "section-head" }, h("h2", { id: "compare-charts-title" }, "Metrics (whole run)")),
      h("div", { class: "chart-toolbar" }, chartView.controls()),
      h("div", { class: "charts" }, charts.map((c) => c.element)),
    ),
    h("section", { "aria-labelledby": "diff-title" }, h("h2", { id: "diff-title" }, "Config differences"), diffBox),
  );
  if (ids.length < 2) {
    fill(diffBox, h("p", { class: "form-error" }, "Pick at least two runs in the runs table."));
    return () => {};
  }

  (async () => {
    let runs;
    try {
      runs = await Promise.all(
        ids.map(async (id) => {
          const [run, metrics] = await Promise.all([api(`/v1/runs/${id}`), api(`/v1/runs/${id}/metrics`)]);
          const store = new MetricStore();
          store.add(toPoints(metrics));
          return { ...run, store };
        }),
      );
    } catch (err) {
      if (!disposed) fill(diffBox, h("p", { class: "form-error", role: "alert" }, `Could not load the runs: ${errorMessage(err)}`));
      return;
    }
    if (disposed) return;
    fill(
      legend,
      runs.map((run, i) =>
        h(
          "li",
          {},
          h("span", { class: "swatch", style: `background: ${COLORS[i % COLORS.length]}` }),
          h("a", { href: `#/runs/${run.id}` }, run.name || run.id),
          " ",
          statusBadge(run.status),
        ),
      ),
    );
    COMPARE_CHARTS.forEach((spec, c) => {
      const perRun = runs.map((run) => run.store.chartData(spec, "all", run.store.stageOffsets(run.stages)));
      const steps = [...new Set(perRun.flatMap((d) => d.steps))].sort((a, b) => a - b);
      const series = runs
        .map((run, i) => {
          const data = perRun[i];
          if (!data.series.length) return null;
          const byStep = new Map(data.steps.map((step, j) => [step, data.series[0].values[j]]));
          return { name: run.name || run.id, color: COLORS[i % COLORS.length], values: steps.map((s) => byStep.get(s) ?? null) };
        })
        .filter(Boolean);
      charts[c].element.hidden = series.length === 0;
      if (series.length) charts[c].update(steps, series);
    });
    fill(diffBox, diffTable(runs));
  })();

  return () => {
    disposed = true;
    charts.forEach((c) => c.destroy());
  };
}
