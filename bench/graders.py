"""Samples/s of a trivial `python` grader: sandboxed (one process per batch) vs a bare in-process call.

    python bench/graders.py [--samples 20000] [--batch 256] [--smoke]

The sandboxed path is exactly what training runs (trainer_core.graders.scoring.build_grader with the
default sandbox: bubblewrap where installed, else rlimits + a network namespace); the bare path calls
the same grade() compiled in this process, with no isolation — the ceiling.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from trainer_core.grader_config import PythonGrader
from trainer_core.graders.sandbox import default_sandbox
from trainer_core.graders.scoring import build_grader
from trainer_core.graders.templates import make_sample

SOURCE = """
def grade(sample, item):
    return float(sample["output_text"].strip() == item["answer"])
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=256, help="completions scored per sandbox process")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.samples, args.batch, args.repeats = 512, 128, 1

    texts = [str(i % 97) for i in range(args.samples)]
    items = [{"answer": str(i % 89)} for i in range(args.samples)]
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(default_sandbox().describe())

    grader = build_grader(PythonGrader(type="python", name="trivial", source=SOURCE))
    sandboxed: list[float] = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        total = 0.0
        for start in range(0, args.samples, args.batch):
            total += sum(grader(texts[start:start + args.batch], items[start:start + args.batch]).totals)
        sandboxed.append(args.samples / (time.perf_counter() - started))

    namespace: dict = {}
    exec(compile(SOURCE, "<grader>", "exec"), namespace)  # the bare ceiling: same code, no sandbox
    grade = namespace["grade"]
    bare: list[float] = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        bare_total = sum(grade(make_sample(t), i) for t, i in zip(texts, items, strict=True))
        bare.append(args.samples / (time.perf_counter() - started))
    assert bare_total == total, "the sandbox and the bare call disagree"

    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"samples: {args.samples}, batch: {args.batch}, repeats: {args.repeats} (median shown)")
    print(f"bare in-process call: {statistics.median(bare):,.0f} samples/s")
    print(f"sandboxed python grader: {statistics.median(sandboxed):,.0f} samples/s "
          f"(one sandbox process per batch of {args.batch})")


if __name__ == "__main__":
    main()
