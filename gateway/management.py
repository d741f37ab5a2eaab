"""The management port: liveness, readiness and metrics of the whole gateway.

It is served by the supervisor, never on the traffic port, so a flood of
traffic cannot hide the gateway's health, and metrics sum every worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["READINESS", "REGISTRY", "Readiness", "management_app"]


class Readiness:
    """How many workers there are and how many have loaded and subscribed."""

    def __init__(self, probe: Callable[[], tuple[int, int]]) -> None:
        self._probe = probe

    def counts(self) -> tuple[int, int]:
        """(ready workers, expected workers)."""
        return self._probe()


READINESS = web.AppKey("readiness", Readiness)
REGISTRY = web.AppKey("registry", CollectorRegistry)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ready, expected = request.app[READINESS].counts()
    body = {"ready": ready, "workers": expected}
    if ready < expected or expected == 0:
        return web.json_response({"status": "starting", **body}, status=503)
    return web.json_response({"status": "ready", **body})


async def metrics(request: web.Request) -> web.Response:
    # Reading every worker's files is disk I/O: keep it off the event loop.
    output = await asyncio.to_thread(generate_latest, request.app[REGISTRY])
    response = web.Response(body=output)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def management_app(readiness: Readiness, metrics_dir: str) -> web.Application:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]

    app = web.Application()
    app[READINESS] = readiness
    app[REGISTRY] = registry
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
