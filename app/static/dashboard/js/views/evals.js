// Evals: start one, the list, and one eval's results with the models side by side (metrics as rows).

import { api } from "../api.js";
import { errorMessage, fill, h, progressBar, statusBadge } from "../dom.js";
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

// The metrics the API computes (trainer_core.eval_metrics) that need no parameters, most used first.
const METRIC_CHOICES = ["loss", "perplexity", "exact_match", "numeric_match", "preference_accuracy"];

/** The "start an eval" form: models from GET /v1/models, a ready dataset, metrics. */
function startEvalForm() {
  const models = h("select", { id: "eval-models", name: "models", multiple: true, required: true, size: 4 });
  const dataset = h("select", { id: "eval-dataset", name: "dataset", required: true });
  const metrics = METRIC_CHOICES.map((m) => h("input", { type: "checkbox", name: "metrics", value: m, checked: m === "loss" }));
  const submit = h("button", { type: "submit", class: "button-primary" }, "Start eval");
  const error = h("p", { class: "form-error", role: "alert" });
  const form = h(
    "form",
    { class: "eval-form", id: "start-eval", "aria-label": "Start an eval" },
    h("label", {}, "Models", models),
    h("label", {}, "Dataset", dataset),
    h("fieldset", { class: "check-group" }, h("legend", {}, "Metrics"), metrics.map((box) => h("label", { class: "check" }, box, box.value))),
    submit,
    error,
  );
  Promise.all([api("/v1/models"), api("/v1/datasets", { query: { limit: 100 } })])
    .then(([modelList, datasets]) => {
      fill(models, modelList.data.map((m) => h("option", { value: m.id }, m.kind === "base" ? m.id : `${m.id} (${m.kind})`)));
      fill(dataset, datasets.data.filter((d) => d.status === "ready").map((d) => h("option", { value: d.id }, `${d.name || d.id} (${d.format})`)));
    })
    .catch((err) => (error.textContent = `Could not load models and datasets: ${errorMessage(err)}`));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    submit.disabled = true;
    error.textContent = "";
    try {
      const ev = await api("/v1/evals", {
        method: "POST",
        body: {
          models: [...models.selectedOptions].map((o) => o.value),
          dataset_id: dataset.value,
          metrics: metrics.filter((box) => box.checked).map((box) => box.value),
        },
      });
      location.hash = `#/evals/${ev.id}`;
    } catch (err) {
      error.textContent = `Could not start the eval: ${errorMessage(err)}`;
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}

export function renderEvals(view) {
  let disposed = false;
  const body = h("div", {}, h("p", { class: "muted" }, "Loading evals…"));
  fill(view, h("div", { class: "view-header" }, h("h1", {}, "Evals"), openByIdForm()), startEvalForm(), body);
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
                  h("td", {}, h("a", { href: `#/evals/${ev.id}` }, ev.name || ev.id), h("div", { class: "muted small mono" }, ev.id)),
                  h("td", {}, statusBadge(ev.status)),
                  h("td", { class: "small" }, (ev.models ?? []).join(", ")),
                  h("td", { class: "mono small" }, ev.dataset_id ?? "—"),
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

/**
 * Returns {models, metrics, value(model, metric)} of an eval: `results.models` holds one entry per
 * model with its metrics (`results.table` the same as flat rows); metrics are shown as rows.
 */
export function sideBySide(ev) {
  const perModel = new Map();
  for (const row of ev.results?.table ?? []) perModel.set(row.model, row);
  for (const m of ev.results?.models ?? []) perModel.set(m.model, { ...m.metrics, examples: m.num_examples });
  const models = ev.models?.length ? ev.models.filter((m) => perModel.has(m)) : [...perModel.keys()];
  const reported = new Set(models.flatMap((m) => Object.keys(perModel.get(m))));
  reported.delete("model");
  const metrics = [...(ev.metrics ?? []).filter((k) => reported.has(k)), ...[...reported].filter((k) => !ev.metrics?.includes(k))];
  return { models, metrics, value: (model, metric) => perModel.get(model)?.[metric] };
}

const sampleText = (sample) =>
  typeof sample === "string" ? sample : (sample?.completion ?? sample?.output ?? sample?.text ?? JSON.stringify(sample));

/** Generations kept per model, shown side by side: one row per sample, one column per model. */
function samplesTable(ev) {
  const models = ev.results?.models ?? [];
  const rows = Math.max(0, ...models.map((m) => m.samples?.length ?? 0));
  if (!rows) return null;
  return h(
    "section",
    { "aria-labelledby": "samples-title" },
    h("h2", { id: "samples-title" }, "Sample generations"),
    h(
      "div",
      { class: "table-scroll" },
      h(
        "table",
        { class: "table samples", id: "eval-samples" },
        h("caption", { class: "visually-hidden" }, "Generations by model"),
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Prompt"), models.map((m) => h("th", { scope: "col", class: "mono" }, m.model)))),
        h(
          "tbody",
          {},
          Array.from({ length: rows }, (_, i) => {
            const prompt = models.map((m) => m.samples?.[i]?.prompt).find((p) => p != null);
            return h(
              "tr",
              {},
              h("td", { class: "pre" }, typeof prompt === "string" ? prompt : JSON.stringify(prompt ?? "")),
              models.map((m) => h("td", { class: "pre" }, m.samples?.[i] == null ? "—" : sampleText(m.samples[i]))),
            );
          }),
        ),
      ),
    ),
  );
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
      h("div", { class: "view-header" }, h("h1", {}, ev.name || ev.id, " ", statusBadge(ev.status))),
      h("p", { class: "muted" }, `Dataset ${ev.dataset_id ?? "—"} · ${formatDate(ev.created_at)}`),
      ev.status === "running" ? progressBar(ev.progress, "Eval progress") : null,
      ev.error ? h("p", { class: "form-error" }, `${ev.error.model ? `${ev.error.model}: ` : ""}${ev.error.message}`) : null,
      h("section", { "aria-labelledby": "results-title" }, h("h2", { id: "results-title" }, "Results side by side"), table),
      samplesTable(ev),
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
