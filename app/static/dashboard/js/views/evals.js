// Evals: the list, and one eval's results with the models side by side (metrics as rows).

import { api } from "../api.js";
import { errorMessage, fill, h, statusBadge } from "../dom.js";
import { formatDate, formatNumber } from "../format.js";

function openByIdForm() {
  const input = h("input", { id: "eval-id", name: "eval-id", placeholder: "eval_…", required: true, pattern: "eval_.+" });
  const form = h(
    "form",
    { class: "field-inline", "aria-label": "Open an eval by ID" },
    h("label", { for: "eval-id" }, "Eval ID"),
    input,
    h("button", { type: "submit" }, "Open"),
  );
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    location.hash = `#/evals/${input.value.trim()}`;
  });
  return form;
}

export function renderEvals(view) {
  let disposed = false;
  const body = h("div", {}, h("p", { class: "muted" }, "Loading evals…"));
  fill(view, h("div", { class: "view-header" }, h("h1", {}, "Evals"), openByIdForm()), body);
  api("/v1/evals", { query: { limit: 50 } })
    .then((page) => {
      if (disposed) return;
      if (!page.data.length) return fill(body, h("p", { class: "muted" }, "No evals yet. Start one with POST /v1/evals."));
      return fill(
        body,
        h(
          "div",
          { class: "table-scroll" },
          h(
            "table",
            { class: "table", id: "evals-table" },
            h("caption", { class: "visually-hidden" }, "Evals, newest first"),
            h("thead", {}, h("tr", {}, ["Eval", "Status", "Models", "Dataset", "Created"].map((t) => h("th", { scope: "col" }, t)))),
            h(
              "tbody",
              {},
              page.data.map((ev) =>
                h(
                  "tr",
                  {},
                  h("td", {}, h("a", { href: `#/evals/${ev.id}`, class: "mono" }, ev.id)),
                  h("td", {}, statusBadge(ev.status)),
                  h("td", { class: "small" }, (ev.models ?? ev.request?.models ?? []).join(", ")),
                  h("td", { class: "mono small" }, ev.dataset_id ?? ev.request?.dataset_id ?? "—"),
                  h("td", {}, formatDate(ev.created_at)),
                ),
              ),
            ),
          ),
        ),
      );
    })
    .catch((err) => {
      if (!disposed) fill(body, h("p", { class: "muted" }, `The eval list is not available (${errorMessage(err)}); open one by ID.`));
    });
  return () => (disposed = true);
}

/** Returns {models, metrics, value(model, metric)} from the eval's results, whatever their layout. */
export function sideBySide(ev) {
  const table = ev.table ?? ev.results?.table;
  if (table?.columns && table?.rows) {
    // {columns: [model…], rows: [{metric, values: [...]}]} or rows as {metric, <model>: value}
    const models = table.columns;
    const metrics = table.rows.map((r) => r.metric ?? r.name);
    const byMetric = new Map(table.rows.map((r) => [r.metric ?? r.name, r]));
    const value = (model, metric) => {
      const row = byMetric.get(metric);
      return Array.isArray(row?.values) ? row.values[models.indexOf(model)] : row?.[model];
    };
    return { models, metrics, value };
  }
  const perModel = new Map();
  const results = ev.results ?? {};
  const entries = Array.isArray(results.models)
    ? results.models.map((m) => [m.model ?? m.id, m.metrics ?? m])
    : Object.entries(results).filter(([, v]) => v && typeof v === "object" && !Array.isArray(v));
  for (const [model, metrics] of entries) perModel.set(model, metrics);
  const models = [...perModel.keys()];
  const metrics = [...new Set(models.flatMap((m) => Object.keys(perModel.get(m))))].filter(
    (k) => typeof perModel.get(models[0])?.[k] !== "object",
  );
  return { models, metrics, value: (model, metric) => perModel.get(model)?.[metric] };
}

export function renderEval(view, evalId) {
  let disposed = false;
  let timer = null;
  const load = async () => {
    let ev;
    try {
      ev = await api(`/v1/evals/${encodeURIComponent(evalId)}`);
    } catch (err) {
      if (!disposed) fill(view, h("p", { class: "form-error", role: "alert" }, `Could not load eval ${evalId}: ${errorMessage(err)}`));
      return;
    }
    if (disposed) return;
    const { models, metrics, value } = sideBySide(ev);
    const table = models.length
      ? h(
          "div",
          { class: "table-scroll" },
          h(
            "table",
            { class: "table", id: "eval-results" },
            h("caption", { class: "visually-hidden" }, "Metrics by model"),
            h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Metric"), models.map((m) => h("th", { scope: "col", class: "mono" }, m)))),
            h(
              "tbody",
              {},
              metrics.map((metric) =>
                h("tr", {}, h("th", { scope: "row" }, metric), models.map((m) => h("td", { class: "num" }, formatNumber(value(m, metric))))),
              ),
            ),
          ),
        )
      : h("p", { class: "muted" }, ev.status === "failed" ? "The eval failed; no results." : "No results yet.");
    fill(
      view,
      h("p", { class: "breadcrumb" }, h("a", { href: "#/evals" }, "← All evals")),
      h("div", { class: "view-header" }, h("h1", {}, ev.id, " ", statusBadge(ev.status))),
      ev.error ? h("p", { class: "form-error" }, ev.error.message ?? JSON.stringify(ev.error)) : null,
      h("section", { "aria-labelledby": "results-title" }, h("h2", { id: "results-title" }, "Results side by side"), table),
    );
    if (ev.status === "queued" || ev.status === "running") timer = setTimeout(load, 3000);
  };
  fill(view, h("p", { class: "muted" }, "Loading eval…"));
  load();
  return () => {
    disposed = true;
    clearTimeout(timer);
  };
}
