"""`tuneyard api` with one change, a database pool at least as large as the request thread pool.

    .venv/bin/python bench/api_pool_fix.py --port 8002 [--pool-size 60]

The proposed fix measured by api_load.py (targets run_fix, metrics_fix); the shipped app is
untouched. Why: sync routes and the sync `get_session` dependency run on anyio's thread pool
(40 threads). With 20 pooled connections (10 + 10 overflow), more than 20 concurrent requests
park threads in the pool's checkout while the requests holding connections wait for a free thread
to run their handler and the session teardown — every thread waits until the 30 s pool timeout.
"""

from __future__ import annotations

import argparse
from typing import Any

import uvicorn

import app.db.session


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--pool-size", type=int, default=60, help="> anyio's 40 worker threads")
    args = parser.parse_args()
    shipped = app.db.session.create_engine

    def create_engine(url: Any, **kwargs: Any) -> Any:
        if "pool_size" in kwargs:  # PostgreSQL: the one setting this wrapper changes
            kwargs.update(pool_size=args.pool_size, max_overflow=0)
        return shipped(url, **kwargs)

    app.db.session.create_engine = create_engine
    uvicorn.run(
        "app.main:build_app", factory=True, host=args.host, port=args.port, log_config=None, access_log=False
    )


if __name__ == "__main__":
    main()
