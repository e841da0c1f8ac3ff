"""One rank of a run trained on several devices (``torchrun ... -m worker.rank_main ARGS_JSON``).

The worker (``worker.gang``) launches it under torchrun with an arguments file; every rank runs the
same ``run_pipeline`` on its device (``cuda:LOCAL_RANK``, or CPU with gloo where there is no GPU).
Rank 0 reports through a JSON-lines file the worker replays into the database, and writes how the
run ended (or the error that ended it) to the result file. Imports nothing of the service layer:
the database stays with the worker process.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from trainer_core.config import RunSpec
from trainer_core.distributed import end_process_group, start_process_group
from trainer_core.pipeline import run_pipeline
from trainer_core.reporting import JsonlReporter, SilentReporter


def main(argv: list[str]) -> int:
    """Returns the rank's exit code (non-zero makes torchrun end the whole gang)."""
    args = json.loads(Path(argv[0]).read_text())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    ranks = start_process_group(device, args["collective_timeout_seconds"])
    reporter = (JsonlReporter(Path(args["reports"]), Path(args["stop_file"])) if ranks.is_main
                else SilentReporter())
    result_file = Path(args["result_file"])
    try:
        result = run_pipeline(
            RunSpec.model_validate(args["spec"]), base_model_path=Path(args["base_model_path"]),
            dataset_paths={k: Path(v) for k, v in args["dataset_paths"].items()},
            dataset_formats=args["dataset_formats"], work_dir=Path(args["work_dir"]), reporter=reporter,
            device=str(device), ranks=ranks,
            start_adapter=Path(args["start_adapter"]) if args["start_adapter"] else None,
        )
    except Exception as exc:
        if ranks.is_main:
            result_file.write_text(json.dumps({"error_type": type(exc).__name__, "message": str(exc)}))
        raise
    if ranks.is_main:
        result_file.write_text(json.dumps({"status": result.status, "final_metrics": result.final_metrics,
                                           "exports": {k: str(v) for k, v in result.exports.items()}}))
    end_process_group(ranks)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
