"""`tuneyard api` with the proposed fix for its stall under concurrency; the shipped app is untouched.

    .venv/bin/python bench/api_pool_fix.py --port 8002 [--pool-size 60]

Measured by api_load.py (targets run_fix, metrics_fix). The stall: sync routes and the sync
`get_session` / `get_current_team` dependencies each run on anyio's thread pool (40 threads), and
a request's session keeps its pooled connection from the auth query until the teardown. So every
request in flight past authentication holds a connection while it waits for a thread; with more
concurrent requests than pooled connections (10 + 10 overflow), all 40 threads end up parked in
the pool's checkout while the connection holders wait for a thread, until the 30 s pool timeout.

Two changes (enough for run status; the metrics route still stalls — for sync routes FastAPI
validates the response in one more threadpool hop while the session still holds its connection;
see bench/README.md, finding 1):
1. authentication ends its transaction (`commit`: read-only, and `expire_on_commit=False` keeps
   the team loaded), so the connection goes back to the pool before the request waits for its
   next thread: connections in use <= threads running;
2. the pool is larger than the thread pool (default 60 > 40), so a running thread never waits.
"""

from __future__ import annotations

import argparse
from typing import Any

import uvicorn

import app.db.session
import app.services.auth


def install_fix(pool_size: int) -> None:
    """Patches the engine factory and the key lookup of this process (see the module docstring)."""
    shipped_engine = app.db.session.create_engine
    shipped_lookup = app.services.auth.team_for_key

    def create_engine(url: Any, **kwargs: Any) -> Any:
        if "pool_size" in kwargs:  # PostgreSQL
            kwargs.update(pool_size=pool_size, max_overflow=0)
        return shipped_engine(url, **kwargs)

    def team_for_key(session: Any, key: str | None) -> Any:
        team = shipped_lookup(session, key)
        session.commit()  # hand the connection back before the request waits for its next thread
        return team

    app.db.session.create_engine = create_engine
    app.services.auth.team_for_key = team_for_key


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--pool-size", type=int, default=60, help="> anyio's 40 worker threads")
    args = parser.parse_args()
    install_fix(args.pool_size)
    uvicorn.run(
        "app.main:build_app", factory=True, host=args.host, port=args.port, log_config=None, access_log=False
    )


if __name__ == "__main__":
    main()
