"""Each bench script still runs end to end (`--smoke`: tiny sizes). Speed is never asserted here.

The four scripts run concurrently to keep the whole test short; the service benches need the
PostgreSQL and Redis of the integration setup (127.0.0.1:5432 and :6379) and are skipped without.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
NEEDS_SERVICES = {"api_load.py", "metrics_ingest.py", "upload.py"}
# A line each script prints only when it got to its figures.
FINAL_LINE = {
    "train_throughput.py": "real tokens/s (median of 1)",
    "train_memory.py": "losses agree across settings",
    "api_load.py": "target run: status",
    "metrics_ingest.py": "replay of the last 10% of steps",
    "upload.py": "target RSS growth",
    "graders.py": "sandboxed python grader:",
}


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_bench_scripts_run_with_smoke_flag() -> None:
    services = _listening(5432) and _listening(6379)
    scripts = [s for s in FINAL_LINE if services or s not in NEEDS_SERVICES]
    procs = {
        script: subprocess.Popen(
            [sys.executable, str(BENCH / script), "--smoke"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for script in scripts
    }
    outputs = {script: proc.communicate(timeout=300)[0] for script, proc in procs.items()}
    for script, proc in procs.items():
        assert proc.returncode == 0, f"{script} --smoke failed:\n{outputs[script][-3000:]}"
        assert FINAL_LINE[script] in outputs[script], (
            f"{script} printed no figures:\n{outputs[script][-3000:]}"
        )
    if not services:
        pytest.skip("PostgreSQL/Redis not reachable: only train_throughput.py was smoke-tested")
