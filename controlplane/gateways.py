"""The live gateway workers of an environment and the revision each has applied."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from controlplane.environments import load_environment
from controlplane.models import GatewaysView, WorkerView
from controlplane.records import rfc3339
from controlplane.routing import Route, json_response, name_param
from controlplane.state import STORE

__all__ = ["routes"]


async def get_gateways(request: web.Request, _: None) -> web.StreamResponse:
    env = name_param(request, "env")
    await load_environment(request, env)
    store = request.app[STORE]

    revision = await store.revision(env)
    workers = [
        WorkerView(
            id=w.id,
            host=w.host,
            pid=w.pid,
            revision=w.revision,
            last_seen=rfc3339(w.last_seen),
        )
        for w in await store.workers(env)
    ]
    return json_response(GatewaysView(revision=revision, workers=workers))


routes: list[Route[Any]] = [
    Route(
        "GET",
        "/environments/{env}/gateways",
        get_gateways,
        "The environment's revision and each live gateway worker's",
        responses={200: GatewaysView},
    ),
]
