// Metric points of one run, keyed by (stage, split, step) like the database rows, so a point
// that arrives twice (initial load, then the stream replaying it) is stored once.

/**
 * Which series each chart plots. `pick: "first"` plots the first source present, "split" the first
 * present per split (train and eval loss on one chart), "all" every one present. Titles name what
 * is plotted: DPO's reward margins are not GRPO's rewards.
 */
export const CHART_SPECS = [
  {
    id: "loss",
    title: "Loss (train and eval)",
    yLabel: "loss",
    pick: "split",
    sources: [["train", "loss"], ["train", "loss/total"], ["eval", "loss"], ["eval", "eval_loss"], ["train", "eval_loss"]],
  },
  {
    id: "reward",
    title: "Reward (mean over completions)",
    yLabel: "reward",
    pick: "all",
    sources: [["train", "reward"], ["train", "objective/scores"]],
  },
  {
    id: "dpo_rewards",
    title: "DPO implicit rewards (chosen, rejected, margin)",
    yLabel: "β · log-ratio",
    pick: "all",
    sources: [["train", "rewards/chosen"], ["train", "rewards/rejected"], ["train", "rewards/margins"]],
  },
  {
    id: "kl",
    title: "KL to the reference",
    yLabel: "KL",
    pick: "all",
    sources: [["train", "kl"], ["train", "objective/kl"], ["train", "kl/reasoning"], ["train", "kl/action"]],
  },
  { id: "lr", title: "Learning rate", yLabel: "lr", pick: "first", sources: [["train", "lr"], ["train", "learning_rate"]] },
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

  /** Returns the (split, name) sources of `spec` that have values in the given stages. */
  chosenSources(spec, stages) {
    const chosen = [];
    const present = (split, name) =>
      stages.some((stage) => [...(this.stages.get(stage)?.get(split)?.values() ?? [])].some((v) => v[name] != null));
    for (const [split, name] of spec.sources) {
      if (spec.pick !== "all" && chosen.some((c) => spec.pick === "first" || c.split === split)) continue;
      if (present(split, name)) chosen.push({ split, name });
    }
    return chosen;
  }

  /**
   * Returns {steps, series: [{name, values}]} of one chart: one stage, or every stage one after
   * the other (`stage` = "all"), each shifted by `offsets[stage]` so the run reads as one x axis.
   */
  chartData(spec, stage, offsets = {}) {
    const stages = stage === "all" ? [...this.stages.keys()].sort((a, b) => a - b) : [stage];
    const chosen = this.chosenSources(spec, stages);
    const splitsShown = new Set(chosen.map((c) => c.split));
    const rows = new Map(); // x -> {`${split}|${name}`: value}
    for (const s of stages) {
      const offset = stage === "all" ? (offsets[s] ?? 0) : 0;
      for (const { split, name } of chosen) {
        for (const [step, values] of this.stages.get(s)?.get(split) ?? []) {
          const value = numberOrNull(values[name]);
          if (value == null) continue;
          const x = step + offset;
          rows.set(x, { ...rows.get(x), [`${split}|${name}`]: value });
        }
      }
    }
    const steps = [...rows.keys()].sort((a, b) => a - b);
    return {
      steps,
      series: chosen.map(({ split, name }) => ({
        name: splitsShown.size > 1 ? `${split} ${name}` : name,
        values: steps.map((x) => rows.get(x)[`${split}|${name}`] ?? null),
      })),
    };
  }

  /** Returns {stage: first whole-run step} from the stages' lengths (or their last step seen). */
  stageOffsets(stagesInfo = []) {
    const offsets = {};
    let offset = 0;
    for (const s of [...stagesInfo].sort((a, b) => a.index - b.index)) {
      offsets[s.index] = offset;
      offset += s.total_steps || this.lastStep(s.index) || s.step || 0;
    }
    return offsets;
  }
}

function numberOrNull(value) {
  const n = typeof value === "number" ? value : Number(value);
  return value == null || Number.isNaN(n) ? null : n;
}
