// A tiny element builder: h("a", {href: "#/runs", class: "x"}, "text", child) — no innerHTML anywhere,
// so API text (names, error messages) can never inject markup.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs ?? {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2).toLowerCase(), value);
    } else if (name === "dataset") {
      Object.assign(el.dataset, value);
    } else if (value === true) {
      el.setAttribute(name, "");
    } else {
      el.setAttribute(name, String(value));
    }
  }
  el.append(...children.flat().filter((c) => c !== undefined && c !== null && c !== false));
  return el;
}

/** Replaces all children of `el`. */
export function fill(el, ...children) {
  el.replaceChildren(...children.flat().filter((c) => c !== undefined && c !== null && c !== false));
  return el;
}

const TERMINAL_RUN_STATES = new Set(["succeeded", "failed", "cancelled"]);

export const isTerminal = (status) => TERMINAL_RUN_STATES.has(status);

export function statusBadge(status) {
  const label = status ?? "unknown";
  return h("span", { class: `badge badge-${label}`, dataset: { status: label } }, label);
}

/** A labelled progress bar; `fraction` in [0, 1] or null when unknown. */
export function progressBar(fraction, label) {
  const pct = fraction == null ? null : Math.round(Math.max(0, Math.min(1, fraction)) * 1000) / 10;
  return h(
    "div",
    {
      class: "progress",
      role: "progressbar",
      "aria-label": label,
      "aria-valuemin": 0,
      "aria-valuemax": 100,
      "aria-valuenow": pct ?? undefined,
    },
    h("div", { class: "progress-fill", style: `width: ${pct ?? 0}%` }),
  );
}

export function errorMessage(error) {
  const where = error?.param ? ` (${error.param})` : "";
  return `${error?.message ?? error}${where}`;
}

let noticeTimer = null;

/** Shows a short message in the page's live region (read out by screen readers). */
export function notify(message, kind = "info") {
  const el = document.getElementById("notice");
  el.textContent = message;
  el.dataset.kind = kind;
  el.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => (el.hidden = true), kind === "error" ? 8000 : 4000);
}
