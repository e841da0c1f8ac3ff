// Pieces of the run page that only render data: stage timeline, config, events log, checkpoints.

import { api, downloadWithKey } from "../api.js";
import { errorMessage, fill, h, notify, progressBar, statusBadge } from "../dom.js";
import { elapsedSeconds, formatBytes, formatDate, formatDateSeconds, formatDuration, formatNumber } from "../format.js";

export function stageTimeline(stages = []) {
  return h(
    "ol",
    { class: "timeline", "aria-label": "Stage timeline" },
    stages.map((s) => {
      const fraction = s.total_steps ? s.step / s.total_steps : s.status === "succeeded" ? 1 : 0;
      const steps = s.total_steps ? `${s.step} / ${s.total_steps} steps` : `${s.step ?? 0} steps`;
      return h(
        "li",
        { class: `timeline-stage stage-${s.status}`, dataset: { stage: String(s.index) } },
        h(
          "div",
          { class: "timeline-head" },
          h("strong", {}, `${s.index + 1}. ${s.method.toUpperCase()}`),
          statusBadge(s.status),
        ),
        progressBar(fraction, `Stage ${s.index + 1} progress`),
        h(
          "div",
          { class: "muted small" },
          steps,
          s.started_at ? ` · started ${formatDate(s.started_at)}` : "",
          s.started_at ? ` · ${formatDuration(elapsedSeconds(s.started_at, s.finished_at))}` : "",
        ),
      );
    }),
  );
}

/** The run's spec as submitted (with its defaults filled in), folded by default. */
export function specView(spec) {
  return h(
    "details",
    { id: "run-spec" },
    h("summary", {}, h("h2", { id: "config-title", class: "inline" }, "Config")),
    h("pre", { class: "code" }, JSON.stringify(spec ?? {}, null, 2)),
  );
}

const MAX_EVENTS = 300;

export function eventItem(event) {
  const level = event.level ?? "info";
  return h(
    "li",
    { class: `event event-${level}`, dataset: { eventId: String(event.id ?? "") } },
    h("time", { datetime: event.created_at ?? "", class: "muted small" }, formatDateSeconds(event.created_at)),
    h("span", { class: `level level-${level}` }, level),
    h("span", { class: "event-kind mono" }, event.kind ?? ""),
    h("span", { class: "event-message" }, event.message ?? ""),
  );
}

/** Keeps the events log: newest first, each event once, at most MAX_EVENTS shown. */
export class EventsLog {
  constructor() {
    this.seen = new Set();
    this.lastId = null;
    this.list = h("ol", { class: "events", "aria-label": "Run events, newest first", reversed: true });
    this.empty = h("p", { class: "muted" }, "No events yet.");
    this.element = h("section", { "aria-labelledby": "events-title" }, h("h2", { id: "events-title" }, "Events"), this.empty, this.list);
  }

  add(events) {
    for (const event of events) {
      const key = event.id ?? `${event.created_at}|${event.kind}|${event.message}`;
      if (this.seen.has(key)) continue;
      this.seen.add(key);
      if (event.id != null && (this.lastId == null || event.id > this.lastId)) this.lastId = event.id;
      this.list.prepend(eventItem(event));
    }
    while (this.list.children.length > MAX_EVENTS) this.list.lastElementChild.remove();
    this.empty.hidden = this.list.children.length > 0;
  }
}

function checkpointSize(ckpt) {
  if (ckpt.size_bytes != null) return ckpt.size_bytes;
  return (ckpt.files ?? []).reduce((sum, f) => sum + (f.size ?? 0), 0);
}

async function download(button, path, filename) {
  button.disabled = true;
  const label = button.textContent;
  button.textContent = "Downloading…";
  try {
    await downloadWithKey(path, filename);
  } catch (err) {
    notify(`Download failed: ${errorMessage(err)}`, "error");
  } finally {
    button.disabled = false;
    button.textContent = label;
  }
}

function fileList(ckpt, files) {
  return h(
    "ul",
    { class: "files" },
    files.map((f) => {
      const name = f.path.split("/").at(-1);
      const button = h(
        "button",
        { type: "button", class: "button-link", "aria-label": `Download ${f.path} of ${ckpt.id}` },
        "Download",
      );
      const url = `/v1/checkpoints/${ckpt.id}/files/${f.path.split("/").map(encodeURIComponent).join("/")}`;
      button.addEventListener("click", () => download(button, url, name));
      return h("li", {}, h("span", { class: "mono" }, f.path), h("span", { class: "muted" }, formatBytes(f.size)), button);
    }),
  );
}

// The list answer carries each checkpoint's files; if one does not, they are fetched on first open.
function filesDetails(ckpt) {
  const summary = h("summary", {}, `Files${ckpt.files ? ` (${ckpt.files.length})` : ""}`);
  if (ckpt.files) return h("details", {}, summary, fileList(ckpt, ckpt.files));
  const body = h("div", {}, h("p", { class: "muted small" }, "Loading files…"));
  const details = h("details", {}, summary, body);
  details.addEventListener(
    "toggle",
    async () => {
      try {
        fill(body, fileList(ckpt, (await api(`/v1/checkpoints/${ckpt.id}`)).files));
      } catch (err) {
        fill(body, h("p", { class: "form-error" }, `Could not list files: ${errorMessage(err)}`));
      }
    },
    { once: true },
  );
  return details;
}

const EXPORT_KINDS = new Set(["adapter", "merged"]);

/** Exports (adapter, merged: what to download or serve) apart from resume checkpoints. */
export function checkpointsTables(checkpoints) {
  if (!checkpoints.length) return h("p", { class: "muted" }, "No checkpoints yet.");
  const exports = checkpoints.filter((c) => EXPORT_KINDS.has(c.kind));
  const resume = checkpoints.filter((c) => !EXPORT_KINDS.has(c.kind));
  return h(
    "div",
    {},
    h("h3", {}, "Exports"),
    exports.length
      ? checkpointTable(exports, "exports-table", "Exported models of this run")
      : h("p", { class: "muted", id: "no-exports" }, "No exports yet: they are written when the run succeeds."),
    resume.length ? h("h3", { class: "spaced" }, "Resume checkpoints") : null,
    resume.length ? checkpointTable(resume, "checkpoints-table", "Resume checkpoints of this run") : null,
  );
}

function checkpointTable(checkpoints, id, caption) {
  const columns = ["Checkpoint", "Stage", "Step", "Kind", "Size", "Metrics", "Download"];
  return h(
    "div",
    { class: "table-scroll" },
    h(
      "table",
      { class: "table stack-on-phone", id },
      h("caption", { class: "visually-hidden" }, caption),
      h("thead", {}, h("tr", {}, columns.map((t) => h("th", { scope: "col" }, t)))),
      h(
        "tbody",
        {},
        checkpoints.map((c) => {
          const archive = h("button", { type: "button", "aria-label": `Download ${c.id} as a tar archive` }, "Archive (.tar)");
          archive.addEventListener("click", () => download(archive, `/v1/checkpoints/${c.id}/archive`, `${c.id}.tar`));
          const metrics = Object.entries(c.metrics ?? {})
            .slice(0, 3)
            .map(([k, v]) => `${k} ${formatNumber(v)}`)
            .join(", ");
          const cell = (label, attrs, ...children) => h("td", { ...attrs, dataset: { label } }, ...children);
          return h(
            "tr",
            { dataset: { checkpointId: c.id } },
            cell("Checkpoint", { class: "mono small cell-id" }, c.id, h("div", { class: "muted" }, formatDate(c.created_at))),
            cell("Stage", {}, String((c.stage_index ?? 0) + 1)),
            cell("Step", {}, String(c.step)),
            cell("Kind", {}, c.kind),
            cell("Size", {}, formatBytes(checkpointSize(c))),
            cell("Metrics", { class: "small" }, metrics || "—"),
            cell("Download", { class: "cell-actions" }, archive, filesDetails(c)),
          );
        }),
      ),
    ),
  );
}
