"""OAuth end to end: control plane, gateway process, agent, and a real OIDC provider."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from gateway.jwks import REFETCH_COOLDOWN_S
from tests.fixtures.idp import ES256_RESOURCE, RS256_RESOURCE, OidcProvider
from tests.fixtures.stack import (
    AgentProcess,
    ControlPlaneProcess,
    GatewayFactory,
    GatewayProcess,
    free_port,
)

ControlPlaneFactory = Callable[[str], Awaitable[ControlPlaneProcess]]


async def deploy_oauth(
    controlplane: ControlPlaneProcess,
    environment: str,
    gateway_url: str,
    agent: AgentProcess,
    provider: OidcProvider,
) -> str:
    """Register the provider by discovery and deploy an OAuth agent; its invoke URL."""
    api = controlplane.url + "/api/v1"
    idp = {"issuer": provider.issuer, "discovery": True, "audiences": [ES256_RESOURCE]}
    oauth = {"identity_providers": ["corp"], "forward_token": False}
    deploy = {
        "environment": environment,
        "endpoint_auth": {"type": "oauth", "oauth": oauth},
    }
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("PUT", f"/environments/{environment}", {"gateway_url": gateway_url}),
        ("PUT", f"/environments/{environment}/identity-providers/corp", idp),
        ("PUT", "/projects/shop", {}),
        ("PUT", "/projects/shop/agents/helper", {"upstream_url": agent.url}),
        ("POST", "/projects/shop/agents/helper/deployments?wait=10", deploy),
    ]
    async with aiohttp.ClientSession(headers=controlplane.headers) as http:
        for method, path, body in calls:
            async with http.request(method, api + path, json=body) as response:
                assert response.status in (200, 201), await response.text()
                answer = await response.json()
    assert answer["propagation"]["pending"] == []
    return str(answer["invoke_url"])


#: A copy of every header only the gateway may set, as a caller could send it.
SPOOFED = {
    "X-Auth-Subject": "spoofed",
    "X-Auth-Issuer": "https://spoofed.example",
    "X-Auth-Identity-Provider": "spoofed",
    "X-Auth-Api-Key-Name": "spoofed",
}


async def invoke(url: str, token: str | None) -> tuple[int, dict[str, str], Any]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return await call(url, {**headers, **SPOOFED})


async def call(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(url + "/chat", headers=headers) as response,
    ):
        return response.status, dict(response.headers), await response.json()


def closed_url() -> str:
    """A URL of 127.0.0.1 where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


def upstream_headers(echo: dict[str, Any]) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    for name, value in echo["headers"]:
        seen.setdefault(name.lower(), []).append(value)
    return seen


async def test_oauth_through_gateway_with_oidc_provider_token(
    gateway_factory: GatewayFactory,
    controlplane_factory: ControlPlaneFactory,
    upstream_agent: AgentProcess,
    oidc_provider: OidcProvider,
    redis_url: str,
    environment: str,
) -> None:
    gateway = await gateway_factory(store=redis_url, environment=environment)
    controlplane = await controlplane_factory(redis_url)
    url = await deploy_oauth(
        controlplane, environment, gateway.url, upstream_agent, oidc_provider
    )
    token = await asyncio.to_thread(oidc_provider.token, ES256_RESOURCE)

    status, _, echo = await invoke(url, token)
    assert status == 200
    seen = upstream_headers(echo)
    assert {name: seen[name] for name in seen if name.startswith("x-auth-")} == {
        "x-auth-subject": ["agents-client"],
        "x-auth-issuer": [oidc_provider.issuer],
        "x-auth-identity-provider": ["corp"],
    }
    assert "authorization" not in seen  # forward_token is false

    status, headers, body = await invoke(url, None)
    assert (status, headers["WWW-Authenticate"]) == (
        401,
        'Bearer realm="agent-gateway"',
    )
    assert body == {"error": "unauthorized", "message": "Bearer token required"}

    wrong_audience = await asyncio.to_thread(oidc_provider.token, RS256_RESOURCE)
    status, headers, body = await invoke(url, wrong_audience)
    assert status == 401
    assert headers["WWW-Authenticate"] == (
        'Bearer realm="agent-gateway", error="invalid_token", '
        'error_description="token audience not accepted"'
    )
    assert body == {
        "error": "invalid_token",
        "message": "Invalid bearer token: token audience not accepted",
    }


async def test_oauth_key_rotation_without_gateway_restart(
    gateway_factory: GatewayFactory,
    controlplane_factory: ControlPlaneFactory,
    upstream_agent: AgentProcess,
    fresh_oidc_provider: OidcProvider,
    redis_url: str,
    environment: str,
) -> None:
    provider = fresh_oidc_provider
    gateway = await gateway_factory(store=redis_url, environment=environment)
    controlplane = await controlplane_factory(redis_url)
    url = await deploy_oauth(
        controlplane, environment, gateway.url, upstream_agent, provider
    )
    keys_loaded = time.monotonic()
    old = await asyncio.to_thread(provider.token, ES256_RESOURCE)
    assert (await invoke(url, old))[0] == 200

    await asyncio.to_thread(provider.rotate)
    new = await asyncio.to_thread(provider.token, ES256_RESOURCE)
    # A new kid is fetched at most once per cooldown since the last fetch.
    await asyncio.sleep(
        max(0.0, keys_loaded + REFETCH_COOLDOWN_S + 0.5 - time.monotonic())
    )

    status, _, echo = await invoke(url, new)
    assert status == 200
    assert upstream_headers(echo)["x-auth-subject"] == ["agents-client"]
    status, headers, _ = await invoke(url, old)
    assert status == 401
    assert headers["WWW-Authenticate"].endswith(
        'error_description="unknown key for the token\'s algorithm"'
    )


MISSING = (
    401,
    'Bearer realm="agent-gateway"',
    {"error": "unauthorized", "message": "Bearer token required"},
)


async def oauth_samples(gateway: GatewayProcess) -> dict[str, float]:
    """The non-zero OAuth, JWKS and token-cache counters of the management port."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(gateway.admin_url + "/metrics") as response,
    ):
        text = await response.text()
    samples = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith(("agw_oauth_", "agw_jwks_", "agw_token_")):
            samples[name] = float(value)
    return {name: value for name, value in samples.items() if value}


async def test_oauth_through_gateway_missing_forms_and_metrics(
    gateway_factory: GatewayFactory,
    controlplane_factory: ControlPlaneFactory,
    upstream_agent: AgentProcess,
    oidc_provider: OidcProvider,
    redis_url: str,
    environment: str,
) -> None:
    gateway = await gateway_factory(store=redis_url, environment=environment)
    controlplane = await controlplane_factory(redis_url)
    url = await deploy_oauth(
        controlplane, environment, gateway.url, upstream_agent, oidc_provider
    )
    down = {"issuer": "https://down.example", "jwks_uri": f"{closed_url()}/jwks"}
    idp = f"{controlplane.url}/api/v1/environments/{environment}/identity-providers"
    async with (
        aiohttp.ClientSession(headers=controlplane.headers) as http,
        http.put(f"{idp}/down", json=down) as response,
    ):
        assert response.status == 201

    # What each is on the wire: "Bearer " arrives as "Bearer".
    for value in ("", "Bearer", "Bearer ", "bearer \t", "Basic dXNlcjpwYXNz"):
        status, headers, body = await call(url, {"Authorization": value})
        assert (status, headers["WWW-Authenticate"], body) == MISSING
    assert (await call(url, {}))[0] == 401
    token = await asyncio.to_thread(oidc_provider.token, ES256_RESOURCE)
    for _ in range(3):  # verified, verified and kept, then a cache hit
        assert (await invoke(url, token))[0] == 200
    other = await asyncio.to_thread(oidc_provider.token, RS256_RESOURCE)
    assert (await invoke(url, other))[0] == 401

    error = 'agw_jwks_fetches_total{identity_provider="down",result="error"}'
    expected = {
        'agw_oauth_requests_total{outcome="allowed",reason=""}': 3.0,
        'agw_oauth_requests_total{outcome="denied",reason="missing"}': 6.0,
        'agw_oauth_requests_total{outcome="denied",reason="audience"}': 1.0,
        'agw_jwks_fetches_total{identity_provider="corp",result="ok"}': 1.0,
        error: 1.0,
        'agw_token_cache_total{result="hit"}': 1.0,
        'agw_token_cache_total{result="miss"}': 3.0,
    }
    # Request counts reach the metrics within a flush interval (1 s).
    samples = await oauth_samples(gateway)
    for _ in range(200):
        if samples == expected:
            break
        await asyncio.sleep(0.05)
        samples = await oauth_samples(gateway)
    assert samples == expected
