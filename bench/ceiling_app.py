"""The machine's reference points for api_load.py, served exactly as `tuneyard api` serves the real app.

    .venv/bin/python bench/ceiling_app.py --port 8001 [--database-url postgresql://...]

- GET /v1/constant: returns a constant — the ceiling of one uvicorn process on this machine.
- GET /v1/one_query/{run_id} (with --database-url): one async PostgreSQL round trip (the run's
  row, no auth) on a small pool of psycopg async connections — the floor a run-status endpoint
  could reach with a single query, to tell the cost of our queries from the cost of any query.

One uvicorn process, default loop and HTTP implementation, no access log, like `tuneyard api`.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException

CONSTANT = {"id": "run_constant", "object": "run", "status": "running"}
POOL_SIZE = 10
RUN_QUERY = "SELECT id, name, status, base_model, attempt, created_at, started_at FROM runs WHERE id = %s"


def build_app(database_url: str | None) -> FastAPI:
    """Returns the reference app; the one-query endpoint exists only with a database URL."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if database_url is None:
            yield
            return
        import psycopg

        pool: asyncio.Queue[Any] = asyncio.Queue()
        for _ in range(POOL_SIZE):
            pool.put_nowait(await psycopg.AsyncConnection.connect(database_url, autocommit=True))
        app.state.pool = pool
        yield
        while not pool.empty():
            await pool.get_nowait().close()

    app = FastAPI(lifespan=lifespan)

    @app.get("/v1/constant")
    async def constant() -> dict[str, str]:
        return CONSTANT

    @app.get("/v1/one_query/{run_id}")
    async def one_query(run_id: str) -> dict[str, Any]:
        conn = await app.state.pool.get()
        try:
            cursor = await conn.execute(RUN_QUERY, (run_id,))
            row = await cursor.fetchone()
        finally:
            app.state.pool.put_nowait(conn)
        if row is None:
            raise HTTPException(404)
        keys = ("id", "name", "status", "base_model", "attempt", "created_at", "started_at")
        return dict(zip(keys, row, strict=True))

    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--database-url", help="libpq URL; enables /v1/one_query/{run_id}")
    args = parser.parse_args()
    uvicorn.run(
        build_app(args.database_url), host=args.host, port=args.port, log_config=None, access_log=False
    )


if __name__ == "__main__":
    main()
