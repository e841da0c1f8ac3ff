// Line charts over steps, drawn with the vendored uPlot (window.uPlot): hover values in the legend,
// axis labels, and the shared view settings (smoothing, log scale) of every chart on the page.

import { h } from "./dom.js";
import { formatNumber } from "./format.js";

const LIBRARY_URL = "/dashboard/static/vendor/uPlot.iife.min.js";
let libraryLoading = null;

/** Resolves once the vendored uPlot is loaded; only pages with charts pay for it. */
export function loadChartLibrary() {
  if (window.uPlot) return Promise.resolve();
  libraryLoading ??= new Promise((resolve, reject) => {
    const script = h("script", { src: LIBRARY_URL });
    script.addEventListener("load", resolve);
    script.addEventListener("error", () => reject(new Error("the chart library did not load")));
    document.head.append(script);
  });
  return libraryLoading;
}

export const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2"];
const HEIGHT = 200;

/** View settings shared by the charts of a page: EMA smoothing weight (0 = raw) and log-scale y. */
export class ChartView {
  constructor() {
    this.smoothing = 0;
    this.log = false;
    this.listeners = new Set();
  }

  set(changes) {
    Object.assign(this, changes);
    this.listeners.forEach((listener) => listener());
  }

  /** Returns the toolbar (smoothing slider, log-scale box) that changes this view. */
  controls() {
    const slider = h("input", { type: "range", id: "chart-smoothing", min: "0", max: "0.99", step: "0.01", value: String(this.smoothing) });
    const shown = h("output", { for: "chart-smoothing", class: "mono small" }, this.smoothing.toFixed(2));
    slider.addEventListener("input", () => {
      shown.textContent = Number(slider.value).toFixed(2);
      this.set({ smoothing: Number(slider.value) });
    });
    const log = h("input", { type: "checkbox", id: "chart-log" });
    log.addEventListener("change", () => this.set({ log: log.checked }));
    return h(
      "div",
      { class: "chart-controls" },
      h("label", { for: "chart-smoothing" }, "Smoothing"),
      slider,
      shown,
      h("label", { class: "check" }, log, " Log scale"),
    );
  }
}

/**
 * Returns an exponential moving average of `values` (nulls kept), debiased like TensorBoard's so
 * the first points are not pulled towards zero.
 */
export function smooth(values, weight) {
  if (!weight) return values;
  let last = 0;
  let count = 0;
  return values.map((v) => {
    if (v == null) return null;
    last = last * weight + (1 - weight) * v;
    count += 1;
    return last / (1 - weight ** count);
  });
}

/** One chart in a <figure>: `update(steps, series)` redraws it with [{name, values}] series. */
export class MetricChart {
  constructor({ id, title, yLabel }, view = new ChartView()) {
    this.title = title;
    this.yLabel = yLabel ?? title;
    this.view = view;
    this.key = "";
    this.plot = null;
    this.data = null;
    this.canvas = h("div", { class: "chart-canvas", role: "img", "aria-label": `${title} chart` });
    this.caption = h("figcaption", { class: "chart-caption" });
    this.element = h(
      "figure",
      { class: "chart", id: `chart-${id}`, dataset: { metric: id, points: "0", series: "0" } },
      h("h3", { class: "chart-title" }, title),
      this.canvas,
      this.caption,
    );
    this.resizer = new ResizeObserver(() => this.resize());
    this.resizer.observe(this.canvas);
    this.onView = () => this.data && this.update(...this.data);
    view.listeners.add(this.onView);
  }

  width() {
    return Math.max(200, Math.floor(this.canvas.clientWidth || 300));
  }

  resize() {
    if (this.plot && this.plot.width !== this.width()) this.plot.setSize({ width: this.width(), height: HEIGHT });
  }

  build(series, log) {
    this.plot?.destroy();
    const options = {
      width: this.width(),
      height: HEIGHT,
      // The legend under the chart shows each series' value at the hovered step.
      legend: { show: true, live: true },
      cursor: { drag: { x: true, y: false }, points: { size: 7 } },
      scales: { x: { time: false }, y: log ? { distr: 3 } : {} },
      axes: [
        { label: "step", size: 40, labelSize: 16 },
        { label: this.yLabel, labelSize: 16, size: axisWidth, values: (_, ticks) => formatTicks(ticks) },
      ],
      series: [
        { label: "step", value: (_, v) => (v == null ? "—" : String(v)) },
        ...series.map((s, i) => ({
          label: s.name,
          stroke: s.color ?? COLORS[i % COLORS.length],
          width: 1.5,
          spanGaps: true,
          value: (_, v) => formatNumber(v),
        })),
      ],
    };
    this.plot = new window.uPlot(options, [[], ...series.map(() => [])], this.canvas);
  }

  update(steps, series) {
    this.data = [steps, series];
    loadChartLibrary().then(
      () => this.draw(steps, series),
      () => (this.canvas.textContent = "The chart library did not load; the latest values are below."),
    );
    const latest = series.map((s) => `${s.name} ${formatNumber(lastValue(s.values))}`).join(" · ");
    this.caption.textContent = steps.length
      ? `${steps.length} point${steps.length === 1 ? "" : "s"} · step ${steps.at(-1)} · ${latest}`
      : "No points yet";
  }

  draw(steps, series) {
    if (this.destroyed) return;
    // A log axis needs positive values: a series with zeros or negatives stays linear.
    const log = this.view.log && series.every((s) => s.values.every((v) => v == null || v > 0));
    const key = `${series.map((s) => s.name).join("|")}|${log}`;
    if (!this.plot || key !== this.key) {
      this.key = key;
      this.build(series, log);
    }
    this.plot.setData([steps, ...series.map((s) => smooth(s.values, this.view.smoothing))]);
    // What is drawn, for tests and tools.
    this.element.dataset.points = String(steps.length);
    this.element.dataset.series = String(series.length);
  }

  destroy() {
    this.destroyed = true;
    this.resizer.disconnect();
    this.view.listeners.delete(this.onView);
    this.plot?.destroy();
  }
}

// Tick labels with the fewest significant digits (2 to 6) that still tell every tick apart;
// exponent form only for very small or large values.
function formatTicks(ticks) {
  const big = ticks.some((v) => v != null && v !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e5));
  let labels = [];
  for (let digits = 2; digits <= 6; digits += 1) {
    labels = ticks.map((v) => {
      if (v == null) return "";
      if (v === 0) return "0";
      return big ? v.toExponential(digits - 1) : String(Number(v.toPrecision(digits)));
    });
    if (new Set(labels).size === labels.length) break;
  }
  return labels;
}

// The y axis is as wide as its longest label (uPlot calls this with the formatted labels).
function axisWidth(_, labels) {
  const longest = Math.max(3, ...(labels ?? []).map((l) => String(l).length));
  return 26 + longest * 7;
}

function lastValue(values) {
  for (let i = values.length - 1; i >= 0; i -= 1) if (values[i] != null) return values[i];
  return null;
}
