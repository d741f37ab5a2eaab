"""One agent switched none -> api_key -> oauth -> api_key -> none, gateway running.

At every step the gateway's exact answers to no credential, an API key and an
OAuth token are checked, and so are the control plane's test call and its
409s while the agent uses oauth. The last switch is deployed without ?wait.
"""

from __future__ import annotations

import asyncio
import json
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
NO_TOKEN = {"error": "unauthorized", "message": "Bearer token required"}
TEST_UNAVAILABLE = {
    "error": "test_unavailable",
    "message": "shop/helper uses oauth in 'dev': the control plane cannot "
    "mint a token for it, so it cannot be tested from here",
    "details": None,
}
KEYS_DISABLED = {
    "error": "api_keys_disabled",
    "message": "shop/helper uses oauth in 'dev': API keys are disabled there "
    "until it is deployed with api_key again",
    "details": None,
}
Client = TestClient[Any, Any]
Answer = tuple[int, Any]


def _passed(*identity: tuple[str, str]) -> Answer:
    """The agent's answer, as :func:`_seen` reduces it, with these identity headers."""
    return 200, {"path": "/hello", "identity": dict(identity)}


def _seen(echo: dict[str, Any]) -> dict[str, Any]:
    """The path the agent got and the X-Auth-* headers the gateway set."""
    headers = [(name.lower(), value) for name, value in echo["headers"]]
    identity = {name: value for name, value in headers if name.startswith("x-auth-")}
    return {"path": echo["path"], "identity": identity}


async def _deploy(api: Client, auth: dict[str, Any], query: str = "?wait=10") -> None:
    body = {"environment": "dev", "endpoint_auth": auth}
    status, answer = await call(api, "POST", AGENT + "/deployments" + query, body)
    assert status == 201, answer
    if query:
        assert answer["propagation"]["pending"] == [], answer


async def _answer(url: str, headers: dict[str, str]) -> Answer:
    async with (
        aiohttp.ClientSession() as http,
        http.get(url, headers=headers) as response,
    ):
        body = await response.json()
        return response.status, _seen(body) if response.status == 200 else body


async def _accepts(url: str, key: str, token: str) -> tuple[Answer, Answer, Answer]:
    """Answers to: no credential, the API key, the OAuth token."""
    return (
        await _answer(url, {}),
        await _answer(url, {"X-API-Key": key}),
        await _answer(url, {"Authorization": f"Bearer {token}"}),
    )


async def _tested(api: Client) -> Answer:
    """The control plane's test call of /hello, its agent answer reduced."""
    status, answer = await call(api, "POST", TEST, {"path": "/hello"})
    if status != 200:
        return status, answer
    assert (answer["status"], answer["body_encoding"]) == (200, "utf-8")
    return status, _seen(json.loads(answer["body"]))


async def _until(
    expected: tuple[Answer, Answer, Answer], url: str, key: str, token: str
) -> None:
    """Poll for at most 1 s until the gateway gives the expected answers."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 1.0
    while (seen := await _accepts(url, key, token)) != expected:
        assert loop.time() < deadline, seen
        await asyncio.sleep(0.01)


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
    subject = (
        ("x-auth-subject", "agents-client"),
        ("x-auth-issuer", oidc_provider.issuer),
        ("x-auth-identity-provider", "corp"),
    )
    test_key = ("x-auth-api-key-name", "_test")

    await call(api, "PUT", "/environments/dev", {"gateway_url": gateway.url})
    idp = {"issuer": oidc_provider.issuer, "jwks_uri": oidc_provider.jwks_uri}
    await call(api, "PUT", "/environments/dev/identity-providers/corp", idp)
    await call(api, "PUT", "/projects/shop", {})
    await call(api, "PUT", AGENT, {"upstream_url": upstream_agent.url})

    # none: everything passes, and no identity is claimed.
    await _deploy(api, {"type": "none"})
    status, key_answer = await call(api, "POST", KEYS + "?wait=10", {"name": "ci"})
    assert status == 201
    key = key_answer["key"]
    assert await _accepts(url, key, token) == (_passed(), _passed(), _passed())
    assert await _tested(api) == _passed()

    # api_key: only the key (and the control plane's own test call).
    await _deploy(api, {"type": "api_key"})
    named = _passed(("x-auth-api-key-name", "ci"))
    assert await _accepts(url, key, token) == (
        (401, UNAUTHORIZED),
        named,
        (401, UNAUTHORIZED),
    )
    assert await _tested(api) == _passed(test_key)

    # oauth: only the token; every key call and the test call are 409.
    oauth = {"identity_providers": ["corp"], "audiences": [RS256_RESOURCE]}
    await _deploy(api, {"type": "oauth", "oauth": oauth})
    assert await _accepts(url, key, token) == (
        (401, NO_TOKEN),
        (401, NO_TOKEN),
        _passed(*subject),
    )
    for method, path, body in [
        ("POST", KEYS, {"name": "other"}),
        ("GET", KEYS, None),
        ("POST", KEYS + "/ci/rotate", None),
        ("DELETE", KEYS + "/ci", None),
    ]:
        assert await call(api, method, path, body) == (409, KEYS_DISABLED)
    assert await _tested(api) == (409, TEST_UNAVAILABLE)
    status, answer = await call(api, "POST", DIAGNOSE, {"token": token})
    assert (status, answer["valid"], answer["identity_provider"]) == (200, True, "corp")

    # api_key again: the kept key works again, tokens no longer.
    await _deploy(api, {"type": "api_key"})
    assert await _accepts(url, key, token) == (
        (401, UNAUTHORIZED),
        named,
        (401, UNAUTHORIZED),
    )
    assert await _tested(api) == _passed(test_key)
    status, listed = await call(api, "GET", KEYS)
    assert (status, [k["name"] for k in listed["api_keys"]]) == (200, ["ci"])
    assert await call(api, "POST", DIAGNOSE, {"token": token}) == (
        409,
        {
            "error": "diagnose_unavailable",
            "message": "shop/helper uses api_key in 'dev': "
            "only oauth deployments validate tokens",
            "details": None,
        },
    )

    # none, without ?wait: open again within 1 s, and the test call, which
    # waits for the deployment itself, sees it at once.
    await _deploy(api, {"type": "none"}, query="")
    assert await _tested(api) == _passed()
    await _until((_passed(), _passed(), _passed()), url, key, token)
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
