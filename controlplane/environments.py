"""Environments: one gateway fleet each, with the URL its callers use."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from controlplane.models import EnvironmentBody, check_url
from controlplane.records import Environment, environment_record, load, now, read
from controlplane.routing import Route, json_response, name_param
from controlplane.state import STORE

__all__ = ["EnvironmentList", "load_environment", "routes"]


class EnvironmentList(msgspec.Struct, kw_only=True):
    """Every environment, sorted by name."""

    environments: list[Environment]


async def load_environment(request: web.Request, env: str) -> Environment:
    store = request.app[STORE]
    return await load(store, environment_record(env), Environment, "environment", env)


async def put_environment(
    request: web.Request, body: EnvironmentBody
) -> web.StreamResponse:
    env = name_param(request, "env")
    gateway_url = check_url(body.gateway_url, "$.gateway_url", plain=True)
    store = request.app[STORE]

    # Not a gateway policy: gateways do not read it, so no revision is spent.
    old, _ = await read(store, environment_record(env), Environment)
    stamp = now()
    record = Environment(
        name=env,
        gateway_url=gateway_url.rstrip("/"),
        created_at=old.created_at if old else stamp,
        updated_at=stamp,
    )
    await store.put(environment_record(env), msgspec.json.encode(record))
    return json_response(record, 200 if old else 201)


async def list_environments(request: web.Request, _: None) -> web.StreamResponse:
    found = await request.app[STORE].scan("environments/")
    items = [msgspec.json.decode(raw, type=Environment) for raw in found.values()]
    return json_response(EnvironmentList(environments=items))


async def get_environment(request: web.Request, _: None) -> web.StreamResponse:
    env = name_param(request, "env")
    return json_response(await load_environment(request, env))


routes: list[Route[Any]] = [
    Route(
        "PUT",
        "/environments/{env}",
        put_environment,
        "Create or update an environment",
        EnvironmentBody,
        {200: Environment, 201: Environment},
    ),
    Route(
        "GET",
        "/environments",
        list_environments,
        "List environments",
        responses={200: EnvironmentList},
    ),
    Route(
        "GET",
        "/environments/{env}",
        get_environment,
        "Read an environment",
        responses={200: Environment},
    ),
]
