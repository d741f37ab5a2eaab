"""Helpers for the control-plane tests: an API client on a real store."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from controlplane.app import create_app
from gateway.store import Store

TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


class AnyTime:
    """Equal to any RFC 3339 UTC timestamp of the API's form."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and _RFC3339.fullmatch(other) is not None

    def __repr__(self) -> str:
        return "<RFC 3339 time>"


TIME = AnyTime()

Client = TestClient[Any, Any]


@pytest.fixture
async def api(aiohttp_client: Callable[..., Awaitable[Client]], store: Store) -> Client:
    """A client of the control plane on each store backend, with the admin token."""
    return await aiohttp_client(create_app(store, TOKEN), headers=AUTH)


async def call(
    api: Client, method: str, path: str, body: object = None, **kwargs: Any
) -> tuple[int, Any]:
    """One API call; returns the status and the decoded JSON answer."""
    if body is not None:
        kwargs["json"] = body
    async with api.request(method, "/api/v1" + path, **kwargs) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json()


async def setup_agent(
    api: Client, env: str = "dev", project: str = "shop", agent: str = "helper"
) -> None:
    """An environment, a project and an agent, ready to deploy."""
    gateway = {"gateway_url": "https://gw.example.com"}
    upstream = {"upstream_url": "http://127.0.0.1:9100"}
    assert (await call(api, "PUT", f"/environments/{env}", gateway))[0] in (200, 201)
    assert (await call(api, "PUT", f"/projects/{project}", {}))[0] in (200, 201)
    path = f"/projects/{project}/agents/{agent}"
    assert (await call(api, "PUT", path, upstream))[0] in (200, 201)


async def add_idp(api: Client, env: str = "dev", name: str = "corp") -> int:
    """An identity provider with a jwks_uri; returns the revision it landed at."""
    body = {
        "issuer": f"https://{name}.example.com",
        "jwks_uri": f"https://{name}.example.com/keys",
    }
    status, answer = await call(
        api, "PUT", f"/environments/{env}/identity-providers/{name}", body
    )
    assert status in (200, 201), answer
    return int(answer["revision"])
