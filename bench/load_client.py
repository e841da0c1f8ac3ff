"""A lean HTTP/1.1 load generator: N keep-alive connections, each sending GETs back to back.

    .venv/bin/python bench/load_client.py --port 8000 --path /healthz [--connections 100] [--duration 10]

Raw asyncio streams on uvloop with pre-encoded requests and minimal response parsing, so one
Python process can drive a few thousand requests/s at a single uvicorn worker without becoming
the bottleneck (httpx costs several times more CPU per request). Prints one JSON object:
requests, seconds, req_per_s, p50_ms, p99_ms, errors (non-2xx or broken connections) and
timeouts (requests still unanswered 5 s after the measured window: a stalled server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field

CONTENT_LENGTH = b"content-length:"


GRACE_SECONDS = 5.0  # how long past the window an outstanding response is waited for


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    timeouts: int = 0  # requests still unanswered GRACE_SECONDS after the window closed


def build_request(host: str, port: int, path: str, headers: list[str]) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Accept: application/json", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def body_length(head: bytes) -> int:
    lower = head.lower()
    at = lower.find(CONTENT_LENGTH)
    if at < 0:
        raise ValueError("response without Content-Length (chunked bodies are not supported)")
    end = lower.find(b"\r\n", at)
    return int(lower[at + len(CONTENT_LENGTH) : end])


async def connection(
    host: str, port: int, request: bytes, measure_from: float, until: float, tally: Tally
) -> None:
    """Sends requests on one connection until `until`; records those started after `measure_from`."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while (started := time.perf_counter()) < until:
            writer.write(request)
            head, _ = await asyncio.wait_for(_response(reader), until + GRACE_SECONDS - started)
            if started >= measure_from:
                tally.latencies.append(time.perf_counter() - started)
                if not head.startswith((b"HTTP/1.1 2", b"HTTP/1.0 2")):
                    tally.errors += 1
    except TimeoutError:
        tally.timeouts += 1
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        tally.errors += 1
    finally:
        writer.close()


async def _response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    return head, await reader.readexactly(body_length(head))


async def run_load(
    host: str, port: int, request: bytes, connections: int, warmup: float, duration: float
) -> dict:
    tally = Tally()
    now = time.perf_counter()
    measure_from, until = now + warmup, now + warmup + duration
    await asyncio.gather(
        *(connection(host, port, request, measure_from, until, tally) for _ in range(connections))
    )
    latencies = sorted(tally.latencies)
    n = len(latencies)

    def pct(q: float) -> float:
        return latencies[min(n - 1, int(q * n))] * 1000 if n else float("nan")

    return {
        "requests": n,
        "seconds": duration,
        "req_per_s": n / duration,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "errors": tally.errors,
        "timeouts": tally.timeouts,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--header", action="append", default=[], help="extra request header, 'Name: value'")
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    args = parser.parse_args(argv)
    request = build_request(args.host, args.port, args.path, args.header)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        result = runner.run(
            run_load(args.host, args.port, request, args.connections, args.warmup, args.duration)
        )
    print(json.dumps(result))


def _loop_factory():  # noqa: ANN202 - returns uvloop's or asyncio's event loop constructor
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    main()
