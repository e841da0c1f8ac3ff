// Line charts of one metric over steps, drawn with the vendored uPlot (window.uPlot).

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

const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2"];
const HEIGHT = 200;

/** One chart in a <figure>: `update(steps, series)` redraws it with [{name, values}] series. */
export class MetricChart {
  constructor({ id, title }) {
    this.title = title;
    this.names = "";
    this.plot = null;
    this.canvas = h("div", { class: "chart-canvas", role: "img", "aria-label": `${title} chart` });
    this.caption = h("figcaption", { class: "chart-caption" });
    this.element = h(
      "figure",
      { class: "chart", id: `chart-${id}`, dataset: { metric: id, points: "0" } },
      h("h3", { class: "chart-title" }, title),
      this.canvas,
      this.caption,
    );
    this.resizer = new ResizeObserver(() => this.resize());
    this.resizer.observe(this.canvas);
  }

  width() {
    return Math.max(200, Math.floor(this.canvas.clientWidth || 300));
  }

  resize() {
    if (this.plot && this.plot.width !== this.width()) this.plot.setSize({ width: this.width(), height: HEIGHT });
  }

  build(series) {
    this.plot?.destroy();
    const options = {
      width: this.width(),
      height: HEIGHT,
      legend: { show: series.length > 1 },
      cursor: { drag: { x: true, y: false } },
      scales: { x: { time: false } },
      axes: [
        { label: "step", size: 36 },
        { size: axisWidth, values: (_, ticks) => formatTicks(ticks) },
      ],
      series: [
        { label: "step" },
        ...series.map((s, i) => ({
          label: s.name,
          stroke: COLORS[i % COLORS.length],
          width: 1.5,
          spanGaps: true,
          value: (_, v) => formatNumber(v),
        })),
      ],
    };
    this.plot = new window.uPlot(options, [[], ...series.map(() => [])], this.canvas);
  }

  update(steps, series) {
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
    const names = series.map((s) => s.name).join("|");
    if (!this.plot || names !== this.names) {
      this.names = names;
      this.build(series);
    }
    this.plot.setData([steps, ...series.map((s) => s.values)]);
    this.element.dataset.points = String(steps.length); // what is drawn, for tests and tools
  }

  destroy() {
    this.destroyed = true;
    this.resizer.disconnect();
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
  return 16 + longest * 7;
}

function lastValue(values) {
  for (let i = values.length - 1; i >= 0; i -= 1) if (values[i] != null) return values[i];
  return null;
}
