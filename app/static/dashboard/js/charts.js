// Line charts of one metric over steps, drawn with the vendored uPlot (window.uPlot).

import { h } from "./dom.js";
import { formatNumber } from "./format.js";

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
      axes: [{ label: "step", size: 36 }, { size: 56, values: (_, ticks) => ticks.map(formatNumber) }],
      series: [
        { label: "step" },
        ...series.map((s, i) => ({
          label: s.name,
          stroke: COLORS[i % COLORS.length],
          width: 1.5,
          points: { show: false },
          spanGaps: true,
          value: (_, v) => formatNumber(v),
        })),
      ],
    };
    this.plot = new window.uPlot(options, [[], ...series.map(() => [])], this.canvas);
  }

  update(steps, series) {
    this.element.dataset.points = String(steps.length);
    const latest = series.map((s) => `${s.name} ${formatNumber(lastValue(s.values))}`).join(" · ");
    this.caption.textContent = steps.length
      ? `${steps.length} point${steps.length === 1 ? "" : "s"} · step ${steps.at(-1)} · ${latest}`
      : "No points yet";
    if (!window.uPlot) {
      this.canvas.textContent = "Chart library did not load; values are in the caption.";
      return;
    }
    const names = series.map((s) => s.name).join("|");
    if (!this.plot || names !== this.names) {
      this.names = names;
      this.build(series);
    }
    this.plot.setData([steps, ...series.map((s) => s.values)]);
  }

  destroy() {
    this.resizer.disconnect();
    this.plot?.destroy();
  }
}

function lastValue(values) {
  for (let i = values.length - 1; i >= 0; i -= 1) if (values[i] != null) return values[i];
  return null;
}
