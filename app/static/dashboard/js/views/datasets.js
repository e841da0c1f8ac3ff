// Datasets: upload, list with status and counts; one dataset with its stats and validation errors by line.

import { api, uploadForm } from "../api.js";
import { errorMessage, fill, h, notify, statusBadge } from "../dom.js";
import { formatBytes, formatDate, formatNumber } from "../format.js";

const PAGE_SIZE = 50;

function datasetRow(ds) {
  return h(
    "tr",
    { dataset: { datasetId: ds.id } },
    h("td", { class: "cell-name" }, h("a", { href: `#/datasets/${ds.id}` }, ds.name || ds.id), h("div", { class: "muted small mono" }, ds.id)),
    h("td", {}, ds.format ?? "—"),
    h("td", {}, statusBadge(ds.status)),
    h("td", { class: "num" }, formatNumber(ds.num_records)),
    h("td", { class: "num" }, formatBytes(ds.size_bytes)),
    h("td", { class: "num" }, String(ds.errors?.length ?? 0)),
    h("td", {}, formatDate(ds.created_at)),
  );
}

const FORMATS = ["sft", "preference", "prompts", "trajectories"];

/** The upload form: a JSONL file and its format (auto-detected when left empty). */
function datasetUploadForm(onUploaded) {
  const file = h("input", { type: "file", id: "upload-file", name: "file", accept: ".jsonl,.json,application/jsonl", required: true });
  const format = h("select", { id: "upload-format", name: "format" }, h("option", { value: "" }, "detect"), FORMATS.map((f) => h("option", { value: f }, f)));
  const submit = h("button", { type: "submit", class: "button-primary" }, "Upload");
  const error = h("p", { class: "form-error", role: "alert" });
  const form = h(
    "form",
    { class: "upload-form", id: "upload-dataset", "aria-label": "Upload a dataset" },
    h("label", {}, "JSONL file", file),
    h("label", {}, "Format", format),
    submit,
    error,
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!file.files.length) return;
    const body = new FormData();
    body.append("file", file.files[0]);
    if (format.value) body.append("format", format.value);
    body.append("name", file.files[0].name);
    submit.disabled = true;
    error.textContent = "";
    try {
      const ds = await uploadForm("/v1/datasets", body);
      notify(`Uploaded ${ds.name}; validating.`);
      form.reset();
      onUploaded(ds);
    } catch (err) {
      error.textContent = `Upload failed: ${errorMessage(err)}`;
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}

export function renderDatasets(view) {
  const cursors = [null];
  let disposed = false;
  const tbody = h("tbody");
  const message = h("p", { class: "muted", role: "status" }, "Loading datasets…");
  const prev = h("button", { type: "button", disabled: true }, "Previous page");
  const next = h("button", { type: "button", disabled: true }, "Next page");
  let page = null;

  fill(
    view,
    h("div", { class: "view-header" }, h("h1", {}, "Datasets")),
    datasetUploadForm((ds) => (location.hash = `#/datasets/${ds.id}`)),
    message,
    h(
      "div",
      { class: "table-scroll" },
      h(
        "table",
        { class: "table", id: "datasets-table" },
        h("caption", { class: "visually-hidden" }, "Datasets, newest first"),
        h(
          "thead",
          {},
          h("tr", {}, ["Name", "Format", "Status", "Records", "Size", "Errors", "Created"].map((t) => h("th", { scope: "col" }, t))),
        ),
        tbody,
      ),
    ),
    h("nav", { class: "pager", "aria-label": "Datasets pages" }, prev, next),
  );

  async function load() {
    try {
      page = await api("/v1/datasets", { query: { limit: PAGE_SIZE, after: cursors.at(-1) } });
    } catch (err) {
      if (!disposed) message.textContent = `Could not load datasets: ${errorMessage(err)}`;
      return;
    }
    if (disposed) return;
    fill(tbody, page.data.map(datasetRow));
    message.textContent = page.data.length ? "" : "No datasets yet. Upload one with POST /v1/datasets.";
    message.hidden = page.data.length > 0;
    prev.disabled = cursors.length <= 1;
    next.disabled = !page.has_more;
  }
  next.addEventListener("click", () => page?.next_cursor && (cursors.push(page.next_cursor), load()));
  prev.addEventListener("click", () => (cursors.length > 1 && cursors.pop(), load()));
  load();
  return () => (disposed = true);
}

function statsList(stats) {
  const entries = Object.entries(stats ?? {});
  if (!entries.length) return h("p", { class: "muted" }, "No statistics yet.");
  // Nested statistics (e.g. token lengths) read as "min 3 · mean 12.5 · max 40", not raw JSON.
  const show = (v) =>
    v && typeof v === "object"
      ? Object.entries(v)
          .map(([k, x]) => `${k.replaceAll("_", " ")} ${x && typeof x === "object" ? JSON.stringify(x) : formatNumber(x)}`)
          .join(" · ")
      : formatNumber(v);
  return h("dl", { class: "summary" }, entries.map(([k, v]) => h("div", {}, h("dt", {}, k.replaceAll("_", " ")), h("dd", {}, show(v)))));
}

function errorsTable(errors) {
  if (!errors?.length) return h("p", { class: "muted" }, "No validation errors.");
  return h(
    "div",
    { class: "table-scroll" },
    h(
      "table",
      { class: "table", id: "dataset-errors" },
      h("caption", { class: "visually-hidden" }, "Validation errors by line"),
      h("thead", {}, h("tr", {}, ["Line", "Field", "Message"].map((t) => h("th", { scope: "col" }, t)))),
      h(
        "tbody",
        {},
        errors.map((e) =>
          h("tr", {}, h("td", { class: "num" }, String(e.line ?? "—")), h("td", { class: "mono" }, e.field ?? "—"), h("td", {}, e.message)),
        ),
      ),
    ),
  );
}

export function renderDataset(view, datasetId) {
  let disposed = false;
  let timer = null;
  fill(view, h("p", { class: "muted" }, "Loading dataset…"));
  const load = () => api(`/v1/datasets/${encodeURIComponent(datasetId)}`)
    .then((ds) => {
      if (disposed) return;
      if (ds.status === "validating") timer = setTimeout(load, 1000); // a fresh upload: show the verdict
      fill(
        view,
        h("p", { class: "breadcrumb" }, h("a", { href: "#/datasets" }, "← All datasets")),
        h("div", { class: "view-header" }, h("h1", {}, ds.name || ds.id, " ", statusBadge(ds.status))),
        h(
          "dl",
          { class: "summary" },
          [
            ["ID", h("span", { class: "mono" }, ds.id)],
            ["Format", ds.format ?? "—"],
            ["Records", formatNumber(ds.num_records)],
            ["Size", formatBytes(ds.size_bytes)],
            ["SHA-256", h("span", { class: "mono small" }, ds.sha256 ?? "—")],
            ["Created", formatDate(ds.created_at)],
          ].map(([t, v]) => h("div", {}, h("dt", {}, t), h("dd", {}, v))),
        ),
        h("section", { "aria-labelledby": "stats-title" }, h("h2", { id: "stats-title" }, "Statistics"), statsList(ds.stats)),
        h(
          "section",
          { "aria-labelledby": "errors-title" },
          h("h2", { id: "errors-title" }, `Validation errors (${ds.errors?.length ?? 0})`),
          errorsTable(ds.errors),
        ),
      );
    })
    .catch((err) => {
      if (!disposed) fill(view, h("p", { class: "form-error", role: "alert" }, `Could not load dataset ${datasetId}: ${errorMessage(err)}`));
    });
  load();
  return () => {
    disposed = true;
    clearTimeout(timer);
  };
}
