"""Upstream agents for load and latency runs: a chat echo and a stamped SSE stream.

``/stream`` sends ``events`` Server-Sent Events ``interval_ms`` apart (query
parameters), each carrying the monotonic clock of the moment it was written,
so a client on the same host can tell how long each event took to arrive.
Every other path answers a short 200 whose body is the request's path.

    python -m bench.upstreams --port 9100
"""

from __future__ import annotations

import argparse
import asyncio
import time

from aiohttp import web

__all__ = ["create_app", "main"]

_MAX_EVENTS = 10_000


async def stream(request: web.Request) -> web.StreamResponse:
    """Stamped events: ``data: <index> <monotonic ns at send>``."""
    try:
        events = min(int(request.query.get("events", "20")), _MAX_EVENTS)
        interval = float(request.query.get("interval_ms", "10")) / 1000
    except ValueError:
        raise web.HTTPUnprocessableEntity(text="events, interval_ms: numbers") from None

    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    for index in range(events):
        await response.write(f"data: {index} {time.monotonic_ns()}\n\n".encode())
        await asyncio.sleep(interval)
    await response.write_eof()
    return response


async def answer(request: web.Request) -> web.Response:
    """A short 200 naming the path it was asked for (tells upstreams apart)."""
    await request.read()
    return web.Response(text=request.path)


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/stream", stream)
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args()
    web.run_app(create_app(), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
