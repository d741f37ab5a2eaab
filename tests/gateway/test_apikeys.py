"""API keys: the table and authenticator, then end to end through a gateway."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.apikeys import ApiKeyAuthenticator, ApiKeyTable
from gateway.auth import AuthFailure
from gateway.policy import ApiKeyPolicy, ApiKeySettings, EndpointAuth, hash_api_key
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
CHALLENGE = {"WWW-Authenticate": 'ApiKey realm="agent-gateway", header="X-API-Key"'}


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


def _answer(failure: AuthFailure) -> tuple[int, dict[str, str], dict[str, str]]:
    body = {"error": failure.error, "message": failure.message}
    return failure.status, body, failure.headers


async def test_apikey_missing_header_is_401() -> None:
    with pytest.raises(AuthFailure) as failure:
        await _auth(_table()).authenticate(_headers(("Authorization", KEY)))
    assert _answer(failure.value) == (401, UNAUTHORIZED, CHALLENGE)


async def test_apikey_sent_twice_is_400() -> None:
    headers = _headers(("X-API-Key", KEY), ("x-api-key", KEY))
    with pytest.raises(AuthFailure) as failure:
        await _auth(_table()).authenticate(headers)
    assert _answer(failure.value) == (
        400,
        {"error": "bad_request", "message": "Send exactly one X-API-Key header"},
        {},
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
    assert _answer(failure.value) == (401, UNAUTHORIZED, CHALLENGE)


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


TWICE = {"error": "bad_request", "message": "Send exactly one X-API-Key header"}


@pytest.mark.parametrize(
    ("path", "headers", "answer"),
    [
        ("/p/a/x", [("X-API-Key", KEY[:-1] + "l")], (401, UNAUTHORIZED)),
        ("/p/a/x", [("X-API-Key", "")], (401, UNAUTHORIZED)),
        ("/p/a/x", [("X-API-Key", "k" * 15000)], (401, UNAUTHORIZED)),
        ("/p/a/x", [], (401, UNAUTHORIZED)),
        ("/p/a/x", [("X-API-Key", KEY), ("X-API-Key", KEY)], (400, TWICE)),
        ("/p/b/x", [("X-API-Key", KEY)], (401, UNAUTHORIZED)),
    ],
)
async def test_apikey_gateway_refuses_bad_keys(
    gateway: GatewayProcess,
    path: str,
    headers: list[tuple[str, str]],
    answer: tuple[int, dict[str, str]],
) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.get(gateway.url + path, headers=CIMultiDict(headers)) as response,
    ):
        assert (response.status, await response.json()) == answer
        challenge = response.headers.get("WWW-Authenticate")
        assert challenge == (
            CHALLENGE["WWW-Authenticate"] if answer[0] == 401 else None
        )


async def _raw_get(gateway: GatewayProcess, header_lines: bytes) -> bytes:
    """One request with these header lines as sent on the wire; the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(
        b"GET /p/a/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
        + header_lines
        + b"\r\n"
    )
    await writer.drain()
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    return answer


async def test_apikey_gateway_key_over_16_kib_is_431_without_echo(
    gateway: GatewayProcess,
) -> None:
    long_key = KEY + "k" * (16 * 1024)
    answer = await _raw_get(gateway, f"X-API-Key: {long_key}\r\n".encode())

    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"431"
    assert json.loads(body) == {
        "error": "header_too_large",
        "message": "A request header line is longer than the gateway accepts",
    }
    assert b"kkkk" not in answer

    # The worker goes on serving.
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{gateway.url}/p/a/x", headers={"X-API-Key": KEY}) as response,
    ):
        assert response.status == 200


async def test_apikey_gateway_accepts_a_key_with_surrounding_whitespace(
    gateway: GatewayProcess,
) -> None:
    # HTTP strips optional whitespace around a field value: the key is intact.
    answer = await _raw_get(gateway, f"X-API-Key: \t {KEY} \t\r\n".encode())

    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 200 OK"
    seen = [(k.lower(), v) for k, v in json.loads(body)["headers"]]
    assert ("x-auth-api-key-name", "ci") in seen
    assert not any(name == "x-api-key" for name, _ in seen)


async def test_apikey_gateway_custom_header_on_redeploy(
    gateway: GatewayProcess,
    redis_store: Store,
    environment: str,
    upstream_agent: AgentProcess,
) -> None:
    custom = EndpointAuth(
        type="api_key", api_key=ApiKeySettings(header_name="X-Agent-Key")
    )
    await commit_agent(
        redis_store, environment, "p", "a", upstream_agent.url, auth=custom
    )

    async with aiohttp.ClientSession() as http:
        for _ in range(100):
            async with http.get(
                f"{gateway.url}/p/a/x", headers={"X-API-Key": KEY}
            ) as response:
                if response.status == 401:
                    assert await response.json() == UNAUTHORIZED
                    assert response.headers["WWW-Authenticate"] == (
                        'ApiKey realm="agent-gateway", header="X-Agent-Key"'
                    )
                    break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the old header still accepted after 1 s")

        async with http.get(
            f"{gateway.url}/p/a/x", headers={"X-Agent-Key": KEY}
        ) as response:
            assert response.status == 200
            seen = [(k.lower(), v) for k, v in (await response.json())["headers"]]
    assert ("x-auth-api-key-name", "ci") in seen
    assert not any(name == "x-agent-key" for name, _ in seen)


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
