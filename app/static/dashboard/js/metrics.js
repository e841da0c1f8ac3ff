// Metric points of one run, keyed by (stage, split, step) like the database rows, so a point
// that arrives twice (initial load, then the stream replaying it) is stored once.

/** Which series each chart plots; `pick: "first"` plots the first name present, "all" plots all. */
export const CHART_SPECS = [
  { id: "loss", title: "Loss", pick: "first", sources: [["train", "loss"], ["train", "loss/total"]] },
  {
    id: "eval_loss",
    title: "Eval loss",
    pick: "first",
    sources: [["eval", "loss"], ["eval", "eval_loss"], ["train", "eval_loss"]],
  },
  {
    id: "reward",
    title: "Reward",
    pick: "all",
    sources: [["train", "reward"], ["train", "rewards/margins"], ["train", "objective/scores"]],
  },
  {
    id: "kl",
    title: "KL",
    pick: "all",
    sources: [["train", "kl"], ["train", "objective/kl"], ["train", "kl/reasoning"], ["train", "kl/action"]],
  },
  { id: "lr", title: "Learning rate", pick: "first", sources: [["train", "lr"], ["train", "learning_rate"]] },
];

/** Turns one API/stream metric payload into points {stage, step, split, values}. */
export function toPoints(payload) {
  if (payload == null) return [];
  if (Array.isArray(payload)) return payload.flatMap(toPoints);
  if (Array.isArray(payload.data)) return payload.data.flatMap(toPoints);
  if (Array.isArray(payload.points) && payload.name) return seriesToPoints(payload);
  if (payload.step == null) return [];
  const values = payload.values ?? payload.metrics ?? {};
  return [
    {
      stage: Number(payload.stage_index ?? payload.stage ?? 0),
      step: Number(payload.step),
      split: payload.split ?? "train",
      values,
    },
  ];
}

// Series form: {name, stage, split, points: [[step, value], ...] | [{step, value}, ...]}.
function seriesToPoints(series) {
  const stage = Number(series.stage_index ?? series.stage ?? 0);
  const split = series.split ?? "train";
  return series.points.map((p) => {
    const [step, value] = Array.isArray(p) ? p : [p.step, p.value];
    return { stage, step: Number(step), split, values: { [series.name]: value } };
  });
}

export class MetricStore {
  constructor() {
    this.stages = new Map(); // stage -> split -> step -> values
  }

  add(points) {
    let added = 0;
    for (const { stage, step, split, values } of points) {
      if (!this.stages.has(stage)) this.stages.set(stage, new Map());
      const splits = this.stages.get(stage);
      if (!splits.has(split)) splits.set(split, new Map());
      const steps = splits.get(split);
      if (!steps.has(step)) added += 1;
      steps.set(step, { ...steps.get(step), ...values });
    }
    return added;
  }

  lastStep(stage, split = "train") {
    const steps = this.stages.get(stage)?.get(split);
    if (!steps || steps.size === 0) return null;
    return Math.max(...steps.keys());
  }

  /** Returns {steps, series: [{name, values}]} of one chart for one stage. */
  chartData(spec, stage) {
    const splits = this.stages.get(stage) ?? new Map();
    const chosen = [];
    for (const [split, name] of spec.sources) {
      const rows = splits.get(split);
      if (!rows || ![...rows.values()].some((v) => v[name] != null)) continue;
      chosen.push({ split, name });
      if (spec.pick === "first") break;
    }
    const stepSet = new Set();
    for (const { split } of chosen) for (const step of splits.get(split).keys()) stepSet.add(step);
    const steps = [...stepSet].sort((a, b) => a - b);
    const series = chosen.map(({ split, name }) => {
      const rows = splits.get(split);
      return { name, values: steps.map((step) => numberOrNull(rows.get(step)?.[name])) };
    });
    // Steps where none of the chosen series has a value are dropped (e.g. train steps on an eval chart).
    const keep = steps.map((_, i) => series.some((s) => s.values[i] != null));
    return {
      steps: steps.filter((_, i) => keep[i]),
      series: series.map((s) => ({ name: s.name, values: s.values.filter((_, i) => keep[i]) })),
    };
  }
}

function numberOrNull(value) {
  const n = typeof value === "number" ? value : Number(value);
  return value == null || Number.isNaN(n) ? null : n;
}
