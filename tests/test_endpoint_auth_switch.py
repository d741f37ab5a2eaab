"""One agent switched none -> api_key -> oauth -> api_key -> none, gateway running.

At every step the gateway's answers to no credential, an API key and an OAuth
token are checked, as are the control plane's 409s while the agent uses oauth.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from controlplane.app import create_app
from gateway.store import Store
from tests.controlplane.conftest import AUTH, TOKEN, call
from tests.fixtures.idp import RS256_RESOURCE, OidcProvider
from tests.fixtures.stack import AgentProcess, GatewayFactory

AGENT = "/projects/shop/agents/helper"
KEYS = AGENT + "/environments/dev/api-keys"
TEST = AGENT + "/environments/dev/test"
DIAGNOSE = AGENT + "/environments/dev/diagnose-token"
UNAUTHORIZED = {"error": "unauthorized", "message": "Valid API key required"}
Client = TestClient[Any, Any]


async def _deploy(api: Client, auth: dict[str, Any]) -> None:
    body = {"environment": "dev", "endpoint_auth": auth}
    status, answer = await call(api, "POST", AGENT + "/deployments?wait=10", body)
    assert (status, answer["propagation"]["pending"]) == (201, []), answer


async def _status(url: str, headers: dict[str, str]) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.get(url, headers=headers) as response,
    ):
        await response.read()
        return response.status


async def _accepts(url: str, key: str, token: str) -> tuple[int, int, int]:
    """Statuses for: no credential, the API key, the OAuth token."""
    return (
        await _status(url, {}),
        await _status(url, {"X-API-Key": key}),
        await _status(url, {"Authorization": f"Bearer {token}"}),
    )


async def test_endpoint_auth_switch_round_trip_without_restart(
    aiohttp_client: Callable[..., Awaitable[Client]],
    store: Store,
    store_location: str,
    gateway_factory: GatewayFactory,
    upstream_agent: AgentProcess,
    oidc_provider: OidcProvider,
) -> None:
    api = await aiohttp_client(create_app(store, TOKEN), headers=AUTH)
    gateway = await gateway_factory(store=store_location, environment="dev")
    url = gateway.url + "/shop/helper/hello"
    token = oidc_provider.token()

    await call(api, "PUT", "/environments/dev", {"gateway_url": gateway.url})
    idp = {"issuer": oidc_provider.issuer, "jwks_uri": oidc_provider.jwks_uri}
    await call(api, "PUT", "/environments/dev/identity-providers/corp", idp)
    await call(api, "PUT", "/projects/shop", {})
    await call(api, "PUT", AGENT, {"upstream_url": upstream_agent.url})

    # none: everything passes.
    await _deploy(api, {"type": "none"})
    status, key_answer = await call(api, "POST", KEYS + "?wait=10", {"name": "ci"})
    assert status == 201
    key = key_answer["key"]
    assert await _accepts(url, key, token) == (200, 200, 200)
    assert (await call(api, "POST", TEST, {}))[1]["status"] == 200

    # api_key: only the key (and the control plane's own test call).
    await _deploy(api, {"type": "api_key"})
    assert await _accepts(url, key, token) == (401, 200, 401)
    assert (await call(api, "POST", TEST, {}))[1]["status"] == 200

    # oauth: only the token; every key call and the test call are 409.
    oauth = {"identity_providers": ["corp"], "audiences": [RS256_RESOURCE]}
    await _deploy(api, {"type": "oauth", "oauth": oauth})
    assert await _accepts(url, key, token) == (401, 401, 200)
    for method, path, body in [
        ("POST", KEYS, {"name": "other"}),
        ("GET", KEYS, None),
        ("POST", KEYS + "/ci/rotate", None),
        ("DELETE", KEYS + "/ci", None),
    ]:
        status, answer = await call(api, method, path, body)
        assert (status, answer["error"]) == (409, "api_keys_disabled")
    status, answer = await call(api, "POST", TEST, {})
    assert (status, answer["error"]) == (409, "test_unavailable")
    status, answer = await call(api, "POST", DIAGNOSE, {"token": token})
    assert (status, answer["valid"]) == (200, True)

    # api_key again: the kept key works again, tokens no longer.
    await _deploy(api, {"type": "api_key"})
    assert await _accepts(url, key, token) == (401, 200, 401)
    status, listed = await call(api, "GET", KEYS)
    assert (status, [k["name"] for k in listed["api_keys"]]) == (200, ["ci"])
    status, answer = await call(api, "POST", DIAGNOSE, {"token": token})
    assert (status, answer["error"]) == (409, "diagnose_unavailable")

    # none: open again; the gateway process never restarted.
    await _deploy(api, {"type": "none"})
    assert await _accepts(url, key, token) == (200, 200, 200)
    assert gateway.process.poll() is None


@pytest.mark.parametrize("auth", ["api_key", "none"])
async def test_endpoint_auth_switch_revoked_key_stays_revoked(
    aiohttp_client: Callable[..., Awaitable[Client]],
    store: Store,
    store_location: str,
    gateway_factory: GatewayFactory,
    upstream_agent: AgentProcess,
    auth: str,
) -> None:
    api = await aiohttp_client(create_app(store, TOKEN), headers=AUTH)
    gateway = await gateway_factory(store=store_location, environment="dev")
    url = gateway.url + "/shop/helper/"
    await call(api, "PUT", "/environments/dev", {"gateway_url": gateway.url})
    await call(api, "PUT", "/projects/shop", {})
    await call(api, "PUT", AGENT, {"upstream_url": upstream_agent.url})

    await _deploy(api, {"type": auth})
    key = (await call(api, "POST", KEYS, {"name": "ci"}))[1]["key"]
    assert (await call(api, "DELETE", KEYS + "/ci"))[0] == 200
    await _deploy(api, {"type": "api_key"})

    async with (
        aiohttp.ClientSession() as http,
        http.get(url, headers={"X-API-Key": key}) as response,
    ):
        assert (response.status, await response.json()) == (401, UNAUTHORIZED)
