"""The machine's ceiling for api_load.py: a FastAPI app whose one endpoint returns a constant.

    .venv/bin/python bench/ceiling_app.py --port 8001

Served exactly as `tuneyard api` serves the real app (one uvicorn process, default loop and HTTP
implementation, no access log), so the difference between the two is the work our endpoints do.
"""

from __future__ import annotations

import argparse

import uvicorn
from fastapi import FastAPI

app = FastAPI()

CONSTANT = {"id": "run_constant", "object": "run", "status": "running"}


@app.get("/v1/constant")
async def constant() -> dict[str, str]:
    return CONSTANT


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_config=None, access_log=False)


if __name__ == "__main__":
    main()
