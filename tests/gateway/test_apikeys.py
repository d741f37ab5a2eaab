"""API keys: the table and authenticator, then end to end through a gateway."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.apikeys import ApiKeyAuthenticator, ApiKeyTable
from gateway.auth import AuthFailure
from gateway.policy import ApiKeyPolicy, ApiKeySettings, hash_api_key
from gateway.store import Store, open_store
from tests.fixtures.stack import (
    API_KEY_AUTH,
    AgentProcess,
    GatewayFactory,
    GatewayProcess,
    commit_agent,
    commit_api_key,
)

KEY = "agw_" + "k" * 43
UNAUTHORIZED = {"error": "unauthorized", "message": "Valid API key required"}


def _table(**overrides: object) -> ApiKeyTable:
    fields: dict[str, object] = {"project": "p", "agent": "a", "name": "ci"}
    fields.update(overrides)
    table = ApiKeyTable()
    table.apply(hash_api_key(KEY), ApiKeyPolicy(**fields))  # type: ignore[arg-type]
    return table


def _headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def _auth(table: ApiKeyTable, header: str = "X-API-Key") -> ApiKeyAuthenticator:
    return ApiKeyAuthenticator(ApiKeySettings(header_name=header), "p", "a", table)


async def test_apikey_valid_key_yields_its_name() -> None:
    identity = await _auth(_table()).authenticate(_headers(("x-api-key", KEY)))
    assert identity.headers == (("X-Auth-Api-Key-Name", "ci"),)


@pytest.mark.parametrize(
    "value",
    [
        KEY[:-1] + "l",
        KEY[:-1],
        KEY + "k",
        "",
        " " + KEY,
        "x" * 100_000,
        "\udcff" + KEY,
    ],
)
async def test_apikey_wrong_keys_are_401(value: str) -> None:
    with pytest.raises(AuthFailure) as failure:
        await _auth(_table()).authenticate(_headers(("X-API-Key", value)))
    assert (failure.value.status, failure.value.error, failure.value.message) == (
        401,
        *UNAUTHORIZED.values(),
    )


async def test_apikey_missing_header_is_401() -> None:
    with pytest.raises(AuthFailure) as failure:
        await _auth(_table()).authenticate(_headers(("Authorization", KEY)))
    assert failure.value.status == 401


async def test_apikey_sent_twice_is_400() -> None:
    headers = _headers(("X-API-Key", KEY), ("x-api-key", KEY))
    with pytest.raises(AuthFailure) as failure:
        await _auth(_table()).authenticate(headers)
    assert (failure.value.status, failure.value.message) == (
        400,
        "Send exactly one X-API-Key header",
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {"expires_at": time.time() - 1},
        {"agent": "b"},
        {"project": "q"},
    ],
)
async def test_apikey_expired_or_other_agents_key_is_401(
    overrides: dict[str, object],
) -> None:
    with pytest.raises(AuthFailure) as failure:
        await _auth(_table(**overrides)).authenticate(_headers(("X-API-Key", KEY)))
    assert failure.value.status == 401


async def test_apikey_future_expiry_is_accepted_and_revocation_applies() -> None:
    table = _table(expires_at=time.time() + 3600)
    auth = _auth(table)
    await auth.authenticate(_headers(("X-API-Key", KEY)))

    table.apply(hash_api_key(KEY), None)
    with pytest.raises(AuthFailure):
        await auth.authenticate(_headers(("X-API-Key", KEY)))


async def test_apikey_custom_header_is_stripped_with_identity_headers() -> None:
    auth = _auth(_table(), header="X-Agent-Key")
    assert "x-agent-key" in auth.strip
    assert "x-auth-api-key-name" in auth.strip
    await auth.authenticate(_headers(("x-agent-key", KEY)))


# -- through a running gateway ---------------------------------------------------


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[Store]:
    store = open_store(redis_url)
    yield store
    await store.close()


@pytest.fixture
async def gateway(
    gateway_factory: GatewayFactory,
    redis_url: str,
    redis_store: Store,
    environment: str,
    upstream_agent: AgentProcess,
) -> GatewayProcess:
    await commit_agent(
        redis_store, environment, "p", "a", upstream_agent.url, auth=API_KEY_AUTH
    )
    await commit_agent(
        redis_store, environment, "p", "b", upstream_agent.url, auth=API_KEY_AUTH
    )
    policy = ApiKeyPolicy(project="p", agent="a", name="ci")
    await commit_api_key(redis_store, environment, KEY, policy)
    return await gateway_factory(store=redis_url, environment=environment)


async def test_apikey_gateway_forwards_name_and_strips_key(
    gateway: GatewayProcess,
) -> None:
    spoofed = {
        "X-Auth-Subject": "spoofed",
        "X-Auth-Issuer": "https://spoofed.example",
        "X-Auth-Identity-Provider": "spoofed",
        "X-Auth-Api-Key-Name": "spoofed",
    }
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{gateway.url}/p/a/x", headers={"X-API-Key": KEY, **spoofed}
        ) as response,
    ):
        assert response.status == 200
        seen = [(k.lower(), v) for k, v in (await response.json())["headers"]]

    assert [(k, v) for k, v in seen if k.startswith("x-auth-")] == [
        ("x-auth-api-key-name", "ci")
    ]
    assert not any(name == "x-api-key" for name, _ in seen)


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/p/a/x", [("X-API-Key", KEY[:-1] + "l")], 401),
        ("/p/a/x", [("X-API-Key", "")], 401),
        ("/p/a/x", [("X-API-Key", "k" * 15000)], 401),
        ("/p/a/x", [], 401),
        ("/p/a/x", [("X-API-Key", KEY), ("X-API-Key", KEY)], 400),
        ("/p/b/x", [("X-API-Key", KEY)], 401),
    ],
)
async def test_apikey_gateway_refuses_bad_keys(
    gateway: GatewayProcess,
    path: str,
    headers: list[tuple[str, str]],
    status: int,
) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.get(gateway.url + path, headers=CIMultiDict(headers)) as response,
    ):
        assert response.status == status
        body = await response.json()

    if status == 401:
        assert body == UNAUTHORIZED


async def test_apikey_gateway_revocation_takes_effect(
    gateway: GatewayProcess, redis_store: Store, environment: str
) -> None:
    await commit_api_key(redis_store, environment, KEY, None)

    async with aiohttp.ClientSession() as http:
        for _ in range(100):
            async with http.get(
                f"{gateway.url}/p/a/x", headers={"X-API-Key": KEY}
            ) as response:
                if response.status == 401:
                    assert await response.json() == UNAUTHORIZED
                    return
            await asyncio.sleep(0.01)
    raise AssertionError("revoked key still accepted after 1 s")
