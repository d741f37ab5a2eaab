"""The test call: a request through a running gateway, as a caller would send it."""

from __future__ import annotations

import base64
import gzip
import json
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from controlplane import invoke
from controlplane.apikeys import ApiKey, apikey_record
from controlplane.errors import Conflict, NotFound
from controlplane.propagation import wait_for
from gateway.policy import ApiKeyPolicy, apikey_key, decode_policy, hash_api_key
from gateway.store import Store, WorkerInfo
from tests.controlplane.conftest import Client, add_idp, call, setup_agent
from tests.fixtures.stack import (
    AgentProcess,
    GatewayFactory,
    commit_api_key,
    free_port,
)

TEST = "/projects/shop/agents/helper/environments/dev/test"
DEPLOY = "/projects/shop/agents/helper/deployments"
KEYS = "/projects/shop/agents/helper/environments/dev/api-keys"
WHERE = ("dev", "shop", "helper")
UNAUTHORIZED = {"error": "unauthorized", "message": "Valid API key required"}
Server = Callable[..., Awaitable[TestServer]]


async def deploy(api: Client, auth: str, query: str = "?wait=10") -> None:
    body = {"environment": "dev", "endpoint_auth": {"type": auth}}
    status, answer = await call(api, "POST", DEPLOY + query, body)
    assert status == 201, answer


@pytest.fixture
async def live(
    api: Client,
    store_location: str,
    gateway_factory: GatewayFactory,
    upstream_agent: AgentProcess,
) -> Client:
    """dev served by a running gateway; helper proxied to the test agent."""
    gateway = await gateway_factory(store=store_location, environment="dev")
    await call(api, "PUT", "/environments/dev", {"gateway_url": gateway.url})
    await call(api, "PUT", "/projects/shop", {})
    agent = {"upstream_url": upstream_agent.url}
    await call(api, "PUT", "/projects/shop/agents/helper", agent)
    return api


async def test_invoke_none_sends_the_request_as_given(live: Client) -> None:
    await deploy(live, "none")
    request = {
        "method": "POST",
        "path": "/chat?x=1",
        "headers": {"X-Trace": "t-1", "Content-Type": "text/plain"},
        "body": "hello",
    }
    status, answer = await call(live, "POST", TEST, request)

    assert status == 200
    assert (answer["status"], answer["body_encoding"], answer["truncated"]) == (
        200,
        "utf-8",
        False,
    )
    assert answer["headers"]["Content-Type"] == "application/json; charset=utf-8"
    echoed = json.loads(answer["body"])
    assert {k: echoed[k] for k in ("agent", "method", "path", "query", "body")} == {
        "agent": "agent",
        "method": "POST",
        "path": "/chat",
        "query": "x=1",
        "body": "hello",
    }
    headers = {name.lower(): value for name, value in echoed["headers"]}
    assert headers["x-trace"] == "t-1"
    assert "x-api-key" not in headers and "x-auth-api-key-name" not in headers


async def test_invoke_api_key_uses_a_hidden_key_reused_while_fresh(
    live: Client, store: Store
) -> None:
    await deploy(live, "api_key")
    status, first = await call(live, "POST", TEST, {"path": "/hello"})

    assert (status, first["status"]) == (200, 200)
    echoed = json.loads(first["body"])
    headers = {name.lower(): value for name, value in echoed["headers"]}
    assert headers["x-auth-api-key-name"] == invoke.HIDDEN_KEY_NAME
    assert "x-api-key" not in headers
    assert "x-api-key" not in {name.lower() for name in first["headers"]}

    raw = await store.get(apikey_record("dev", "shop", "helper", "_test"))
    assert raw is not None
    record = json.loads(raw)
    assert (record["hidden"], record["name"]) == (True, "_test")
    revision = await store.revision("dev")

    # A second call reuses the key: no new commit.
    status, second = await call(live, "POST", TEST, {"path": "/hello"})
    assert (status, second["status"]) == (200, 200)
    assert await store.revision("dev") == revision
    assert await store.get(apikey_record("dev", "shop", "helper", "_test")) == raw
    assert await call(live, "GET", KEYS) == (200, {"api_keys": []})


async def _gateway_get(url: str, key: str) -> tuple[int, Any]:
    """A request straight to the gateway with ``key``: the status and JSON body."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(url, headers={"X-API-Key": key}) as response,
    ):
        return response.status, await response.json()


async def _hidden(store: Store) -> ApiKey:
    raw = await store.get(apikey_record(*WHERE, invoke.HIDDEN_KEY_NAME))
    assert raw is not None
    return msgspec.json.decode(raw, type=ApiKey)


async def test_invoke_replaced_hidden_key_is_minted_again(
    live: Client, store: Store
) -> None:
    await deploy(live, "api_key")
    assert (await call(live, "POST", TEST, {}))[1]["status"] == 200
    keys = live.app[invoke.TEST_KEYS]
    first = await keys.key_for(store, WHERE)

    # Another control-plane process mints its own: this one's is revoked.
    other = await invoke.TestKeys().key_for(store, WHERE)
    assert (await _hidden(store)).key_hash == other.key_hash
    status, answer = await call(live, "POST", TEST, {})
    assert (status, answer["status"]) == (200, 200)

    record = await _hidden(store)
    again = await keys.key_for(store, WHERE)
    assert record.key_hash == again.key_hash == hash_api_key(again.key)
    assert again.key_hash not in (first.key_hash, other.key_hash)
    assert again.revision == other.revision + 1 == await store.revision("dev")
    url = await gateway_url(live) + "/shop/helper/"
    for stale in (first.key, other.key):
        assert await _gateway_get(url, stale) == (401, UNAUTHORIZED)


async def gateway_url(api: Client) -> str:
    """The URL of dev's gateway, which the test call uses."""
    status, environment = await call(api, "GET", "/environments/dev")
    assert status == 200
    return str(environment["gateway_url"])


async def test_invoke_passes_status_and_binary_bodies(live: Client) -> None:
    await deploy(live, "none")

    status, teapot = await call(live, "POST", TEST, {"path": "/status/418"})
    assert (status, teapot["status"], json.loads(teapot["body"])) == (
        200,
        418,
        {"status": "set"},
    )

    status, packed = await call(live, "POST", TEST, {"path": "/gzip"})
    assert (status, packed["body_encoding"]) == (200, "base64")
    assert packed["headers"]["Content-Encoding"] == "gzip"
    body = gzip.decompress(base64.b64decode(packed["body"]))
    assert body == b"compressed hello " * 20


async def test_invoke_long_answer_is_truncated(
    live: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    await deploy(live, "none")
    monkeypatch.setattr(invoke, "MAX_RESPONSE_BYTES", 1000)

    request = {"method": "POST", "path": "/stream-back", "body": "z" * 5000}
    status, answer = await call(live, "POST", TEST, request)
    assert (status, answer["status"], answer["truncated"]) == (200, 200, True)
    assert answer["body"] == "z" * 1000


async def test_invoke_is_409_while_oauth(api: Client) -> None:
    await setup_agent(api)
    await add_idp(api)
    oauth = {"type": "oauth", "oauth": {"identity_providers": ["corp"]}}
    body = {"environment": "dev", "endpoint_auth": oauth}
    assert (await call(api, "POST", DEPLOY, body))[0] == 201

    assert await call(api, "POST", TEST, {}) == (
        409,
        {
            "error": "test_unavailable",
            "message": "shop/helper uses oauth in 'dev': the control plane cannot "
            "mint a token for it, so it cannot be tested from here",
            "details": None,
        },
    )


async def test_invoke_not_deployed_is_404(api: Client) -> None:
    await setup_agent(api)
    assert await call(api, "POST", TEST, {}) == (
        404,
        {
            "error": "not_found",
            "message": "deployment 'shop/helper in dev' does not exist",
            "details": {"kind": "deployment", "name": "shop/helper in dev"},
        },
    )


@pytest.mark.parametrize("auth", ["none", "api_key"])
async def test_invoke_unreachable_gateway_is_502(
    api: Client, store: Store, auth: str
) -> None:
    await setup_agent(api)
    closed = f"http://127.0.0.1:{free_port()}"
    await call(api, "PUT", "/environments/dev", {"gateway_url": closed})
    await deploy(api, auth, query="")

    assert await call(api, "POST", TEST, {}) == (
        502,
        {
            "error": "gateway_unreachable",
            "message": f"The gateway at {closed} cannot be reached: "
            "ClientConnectorError",
            "details": None,
        },
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"path": "hello"}, "$.path"),
        ({"path": ""}, "$.path"),
        ({"path": "/a b"}, "$.path"),
        ({"path": "/caf\u00e9"}, "$.path"),
        ({"path": "/a#frag"}, "$.path"),
        ({"path": "/../other/x"}, "$.path"),
        ({"path": "/a/%2E%2e/b"}, "$.path"),
        ({"path": "/./a"}, "$.path"),
        ({"path": "/" + "a" * 2048}, "$.path"),
        ({"method": "TRACE"}, "$.method"),
        ({"headers": {"X-Bad": "a\r\nInjected: 1"}}, "$.headers.X-Bad"),
        ({"headers": {"X-Nul": "a\x00"}}, "$.headers.X-Nul"),
        ({"headers": {"X-Long": "v" * 8193}}, "$.headers[...]"),
        ({"headers": {"Bad Name": "v"}}, "$.headers"),
        ({"headers": {"Host": "evil.example.com"}}, "$.headers.Host"),
        ({"headers": {"transfer-encoding": "chunked"}}, "$.headers.transfer-encoding"),
        ({"headers": {"x-api-key": "mine"}}, "$.headers.x-api-key"),
        ({"body": 5}, "$.body"),
        ({"other": 1}, "$.other"),
    ],
)
async def test_invoke_bad_request_is_422_naming_the_field(
    api: Client, body: dict[str, Any], field: str
) -> None:
    await setup_agent(api)
    await deploy(api, "api_key", query="")

    status, answer = await call(api, "POST", TEST, body)
    assert (status, answer["error"]) == (422, "validation_error")
    assert answer["details"] == {"field": field, "in": "body"}


# --- the hidden key: lifetime, and never to the agent -------------------------


async def test_invoke_hidden_key_lives_ten_minutes_and_expires_at_the_gateway(
    live: Client, store: Store
) -> None:
    await deploy(live, "api_key")
    before = time.time()
    assert (await call(live, "POST", TEST, {}))[1]["status"] == 200

    record = await _hidden(store)
    assert record.expires_at is not None
    expires = datetime.fromisoformat(record.expires_at).timestamp()
    assert invoke.HIDDEN_KEY_TTL_S == 600
    assert before + 600 - 1 <= expires <= time.time() + 600
    snapshot = await store.snapshot("dev")
    raw = snapshot.policies[apikey_key(record.key_hash)]
    assert decode_policy("apikey/", raw) == ApiKeyPolicy(
        project="shop", agent="helper", name="_test", expires_at=expires
    )

    # Ten minutes later, as the gateway sees it: the same key, expired.
    held = await live.app[invoke.TEST_KEYS].key_for(store, WHERE)
    past = ApiKeyPolicy(
        project="shop", agent="helper", name="_test", expires_at=time.time() - 1
    )
    revision = await commit_api_key(store, "dev", held.key, past)
    assert (await wait_for(store, "dev", revision, 10)).pending == []
    url = await gateway_url(live) + "/shop/helper/"
    assert await _gateway_get(url, held.key) == (401, UNAUTHORIZED)


async def test_invoke_hidden_key_near_its_expiry_is_replaced(
    live: Client, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    await deploy(live, "api_key")
    assert (await call(live, "POST", TEST, {}))[1]["status"] == 200
    first = await _hidden(store)

    # Every held key now has less than the reuse margin left.
    monkeypatch.setattr(invoke, "_REUSE_MIN_S", invoke.HIDDEN_KEY_TTL_S + 1)
    revision = await store.revision("dev")
    assert (await call(live, "POST", TEST, {}))[1]["status"] == 200
    assert (await _hidden(store)).key_hash != first.key_hash
    assert await store.revision("dev") == revision + 1


@pytest.mark.parametrize(
    ("auth", "error"),
    [
        (
            None,
            NotFound("deployment", "shop/helper in dev"),
        ),
        (
            "none",
            Conflict(
                "concurrent_change",
                "shop/helper was deployed with 'none' in 'dev' while the test "
                "call started; retry",
            ),
        ),
        (
            "oauth",
            Conflict(
                "test_unavailable",
                "shop/helper uses oauth in 'dev': the control plane cannot "
                "mint a token for it, so it cannot be tested from here",
            ),
        ),
    ],
)
async def test_invoke_hidden_key_is_not_minted_unless_deployed_with_api_key(
    api: Client, store: Store, auth: str | None, error: Conflict | NotFound
) -> None:
    await setup_agent(api)
    await add_idp(api)
    if auth is not None:
        section = {"oauth": {"identity_providers": ["corp"]}} if auth == "oauth" else {}
        body = {"environment": "dev", "endpoint_auth": {"type": auth, **section}}
        assert (await call(api, "POST", DEPLOY, body))[0] == 201
    revision = await store.revision("dev")

    with pytest.raises(type(error)) as raised:
        await invoke.TestKeys().key_for(store, WHERE)
    assert (raised.value.code, raised.value.message) == (error.code, error.message)
    assert await store.revision("dev") == revision
    assert await store.get(apikey_record(*WHERE, invoke.HIDDEN_KEY_NAME)) is None


class Recorder:
    """An agent of the test's own that keeps every request's raw header lines."""

    def __init__(self) -> None:
        self.heads: list[list[tuple[bytes, bytes]]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.heads.append(list(request.raw_headers))
        return web.Response(text="ok")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


async def test_invoke_hidden_key_never_reaches_the_agent_after_a_redeploy(
    api: Client,
    store_location: str,
    gateway_factory: GatewayFactory,
    aiohttp_server: Server,
) -> None:
    recorder = Recorder()
    agent = await aiohttp_server(recorder.app())
    gateway = await gateway_factory(store=store_location, environment="dev", workers=2)
    await call(api, "PUT", "/environments/dev", {"gateway_url": gateway.url})
    await call(api, "PUT", "/projects/shop", {})
    upstream = {"upstream_url": str(agent.make_url("")).rstrip("/")}
    await call(api, "PUT", "/projects/shop/agents/helper", upstream)
    await deploy(api, "api_key")
    assert (await call(api, "POST", TEST, {}))[1]["status"] == 200  # key held

    for _ in range(10):
        await deploy(api, "none")
        await deploy(api, "api_key", query="")
        status, answer = await call(api, "POST", TEST, {"path": "/race"})
        assert (status, answer["status"], answer["body"]) == (200, 200, "ok")

    # Every request went through the api_key route, which strips the key.
    heads = [{name.lower(): value for name, value in h} for h in recorder.heads]
    assert [(h.get(b"x-auth-api-key-name"), b"x-api-key" in h) for h in heads] == [
        (b"_test", False)
    ] * 11


@pytest.mark.parametrize("auth", ["none", "api_key"])
async def test_invoke_not_propagated_is_503_and_sends_nothing(
    api: Client,
    store: Store,
    aiohttp_server: Server,
    monkeypatch: pytest.MonkeyPatch,
    auth: str,
) -> None:
    recorder = Recorder()
    server = await aiohttp_server(recorder.app())
    await setup_agent(api)
    gateway = {"gateway_url": str(server.make_url("")).rstrip("/")}
    await call(api, "PUT", "/environments/dev", gateway)
    stuck = WorkerInfo(id="stuck", host="h", pid=1, revision=0, last_seen=time.time())
    await store.heartbeat("dev", stuck, 30.0)
    await deploy(api, auth, query="")
    monkeypatch.setattr(invoke, "_PROPAGATION_S", 0.2)

    status, answer = await call(api, "POST", TEST, {})
    revision = await store.revision("dev")
    assert (status, answer) == (
        503,
        {
            "error": "not_propagated",
            "message": f"Revision {revision} has not reached every live gateway "
            "worker of 'dev' within 0.2 s; the test call was not sent",
            "details": {"revision": revision, "pending": ["stuck"]},
        },
    )
    assert recorder.heads == []


# --- whatever echoes the hidden key, it is redacted -----------------------------


def _echoing_gateway(seen: list[list[tuple[bytes, bytes]]]) -> web.Application:
    """Stands in for a gateway that passes the key on, and an agent that echoes it."""

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append(list(request.raw_headers))
        key = request.headers.get("X-API-Key", "").encode()
        page = request.match_info["page"]
        if page == "binary":
            return web.Response(body=b"\xff" + key + b"\xfe", headers=_echo(key))
        if page == "straddle":
            return web.Response(body=b"x" * 80 + key + b"y" * 200)
        if page == "gzip-text":
            return _gzipped(b"no key here")
        echoed = json.dumps(dict(request.headers)).encode()
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            return _gzipped(echoed)
        return web.Response(body=echoed, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/shop/helper/{page}", handle)
    return app


def _echo(key: bytes) -> dict[str, str]:
    return {"X-Echo": f"key={key.decode()}", "Content-Type": "application/x-raw"}


def _gzipped(body: bytes) -> web.Response:
    packed = gzip.compress(body, mtime=0)
    return web.Response(body=packed, headers={"Content-Encoding": "gzip"})


@pytest.fixture
async def echoing(
    api: Client, aiohttp_server: Server
) -> list[list[tuple[bytes, bytes]]]:
    """helper deployed with api_key, dev's gateway URL on an echoing stand-in."""
    seen: list[list[tuple[bytes, bytes]]] = []
    server = await aiohttp_server(_echoing_gateway(seen))
    await setup_agent(api)
    gateway = {"gateway_url": str(server.make_url("")).rstrip("/")}
    await call(api, "PUT", "/environments/dev", gateway)
    await deploy(api, "api_key", query="")
    return seen


async def test_invoke_hidden_key_is_redacted_from_raw_bodies_and_headers(
    api: Client, echoing: list[list[tuple[bytes, bytes]]]
) -> None:
    status, answer = await call(api, "POST", TEST, {"path": "/binary"})

    assert (status, answer["status"], answer["body_encoding"]) == (200, 200, "base64")
    assert base64.b64decode(answer["body"]) == b"\xff[redacted]\xfe"
    assert answer["headers"]["X-Echo"] == "key=[redacted]"
    assert answer["truncated"] is False


async def test_invoke_sends_no_headers_of_its_own(
    api: Client, echoing: list[list[tuple[bytes, bytes]]]
) -> None:
    request = {"method": "POST", "path": "/echo", "headers": {"X-Trace": "t"}}
    status, answer = await call(api, "POST", TEST, {**request, "body": "hi"})

    assert (status, answer["status"]) == (200, 200)
    assert json.loads(answer["body"])["X-API-Key"] == "[redacted]"
    names = sorted(name.decode().lower() for name, _ in echoing[0])
    assert names == ["content-length", "host", "x-api-key", "x-trace"]


async def test_invoke_compressed_answer_holding_the_key_is_redacted(
    api: Client, echoing: list[list[tuple[bytes, bytes]]]
) -> None:
    asked = {"path": "/echo", "headers": {"Accept-Encoding": "gzip"}}
    status, answer = await call(api, "POST", TEST, asked)
    assert (status, answer["body"], answer["body_encoding"]) == (
        200,
        "[redacted]",
        "utf-8",
    )
    assert "Content-Encoding" not in answer["headers"]

    # A compressed answer without the key passes as sent.
    status, answer = await call(api, "POST", TEST, {**asked, "path": "/gzip-text"})
    assert (status, answer["body_encoding"]) == (200, "base64")
    assert answer["headers"]["Content-Encoding"] == "gzip"
    assert gzip.decompress(base64.b64decode(answer["body"])) == b"no key here"


async def test_invoke_hidden_key_across_the_read_limit_is_redacted_whole(
    api: Client,
    echoing: list[list[tuple[bytes, bytes]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(invoke, "MAX_RESPONSE_BYTES", 100)
    status, answer = await call(api, "POST", TEST, {"path": "/straddle"})

    assert (status, answer["truncated"]) == (200, True)
    assert answer["body"] == "x" * 80 + "[redacted]" + "y" * 10


def test_invoke_scrub_cuts_a_key_the_answer_stopped_in() -> None:
    key = "agw_" + "Q" * 43
    body = b"a" + key.encode() + b"b" + key[:20].encode()

    assert invoke._scrub({}, body, False, key) == ({}, b"a[redacted]b")
    assert invoke._scrub({}, body, True, key) == ({}, b"a[redacted]b" + body[-20:])
