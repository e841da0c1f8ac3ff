"""One rank of a multi-process run, launched by the distributed tests under torchrun (CPU, gloo).

    python -m torch.distributed.run --nproc_per_node N -m tests.unit.trainer_core.distributed_driver \
        SPEC.json MODEL_DIR DATA_DIR WORK_DIR OUT.json

Rank 0 records what the run reported and writes it to OUT.json: the train and eval metrics, the
events and the exports.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tests.unit.trainer_core.factories import DATASET_FORMATS
from trainer_core.config import RunSpec
from trainer_core.distributed import end_process_group, start_process_group
from trainer_core.pipeline import run_pipeline
from trainer_core.reporting import RecordingReporter, SilentReporter


def main(argv: list[str]) -> None:
    spec_path, model_dir, data_dir, work_dir, out = (Path(a) for a in argv)
    spec = RunSpec.model_validate_json(spec_path.read_text())
    ranks = start_process_group(torch.device("cpu"), timeout_seconds=60)
    reporter = RecordingReporter() if ranks.is_main else SilentReporter()
    paths = {key: data_dir / f"{key}.jsonl" for key in DATASET_FORMATS}
    result = run_pipeline(spec, base_model_path=model_dir, dataset_paths=paths,
                          dataset_formats=dict(DATASET_FORMATS), work_dir=work_dir, reporter=reporter,
                          device="cpu", ranks=ranks)
    if ranks.is_main:
        assert isinstance(reporter, RecordingReporter)
        out.write_text(json.dumps({"status": result.status, "metrics": reporter.metrics,
                                   "events": [kind for kind, _, _ in reporter.events],
                                   "exports": {k: str(v) for k, v in result.exports.items()}}))
    end_process_group(ranks)


if __name__ == "__main__":
    main(sys.argv[1:])
