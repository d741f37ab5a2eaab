"""The proxy against a running gateway process, its store and a real test agent."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import re
import socket
import time
from collections.abc import AsyncIterator

import aiohttp
import msgspec
import pytest
import yarl
from prometheus_client.parser import text_string_to_metric_families

from gateway.store import Store, open_store
from tests.fixtures.stack import (
    AgentProcess,
    GatewayFactory,
    GatewayProcess,
    commit_agent,
    exchange_raw,
    free_port,
)


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
    """A one-worker gateway with agent p/a deployed (auth none) and applied."""
    await commit_agent(redis_store, environment, "p", "a", upstream_agent.url)
    return await gateway_factory(store=redis_url, environment=environment)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


def _headers(echo: dict[str, object]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in echo["headers"]:  # type: ignore[attr-defined]
        out.setdefault(name.lower(), []).append(value)
    return out


async def test_proxy_forwards_method_path_query_and_body(
    gateway: GatewayProcess, http: aiohttp.ClientSession
) -> None:
    url = yarl.URL(f"{gateway.url}/p/a/chat/%7Eme/x%2Fy?q=1&r=%2F", encoded=True)
    async with http.post(url, data=b"hello") as response:
        assert response.status == 200
        echo = await response.json()

    assert echo["agent"] == "agent"
    assert echo["method"] == "POST"
    assert echo["path"] == "/chat/~me/x%2Fy"
    assert echo["query"] == "q=1&r=%2F"
    assert echo["body"] == "hello"


async def test_proxy_forwards_dot_segment_free_path(
    gateway: GatewayProcess, http: aiohttp.ClientSession
) -> None:
    url = f"{gateway.url}/p/a/x/%2e%2e/y/./z"
    async with http.get(yarl.URL(url, encoded=True)) as response:
        echo = await response.json()

    assert echo["path"] == "/y/z"


@pytest.mark.parametrize(
    "path",
    [
        "/p/b/chat",
        "/q/a/chat",
        "/p/a%2Fchat",
        "/p%2Fa/chat",
        "/p/a%2E%2E/chat",
        "/x/%2e%2e%2fp/a/chat",
        "//p/a/chat",
        "/P/a/chat",
        "/p/a%20/chat",
        "/p",
        "/",
    ],
)
async def test_proxy_unknown_agent_is_404(
    gateway: GatewayProcess, http: aiohttp.ClientSession, path: str
) -> None:
    url = yarl.URL(gateway.url + path, encoded=True)
    async with http.get(url) as response:
        assert response.status == 404
        assert await response.json() == {
            "error": "not_found",
            "message": "No agent is deployed here",
        }


async def test_proxy_sets_forwarded_headers_and_removes_hop_by_hop(
    gateway: GatewayProcess, http: aiohttp.ClientSession
) -> None:
    headers = {
        "X-Forwarded-For": "203.0.113.7",
        "X-Forwarded-Proto": "https",
        "Connection": "keep-alive, X-Drop-Me",
        "X-Drop-Me": "secret",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic abc",
        "TE": "trailers",
        "X-Auth-Subject": "spoofed",
        "X-Auth-Issuer": "spoofed",
        "X-Auth-Identity-Provider": "spoofed",
        "X-Auth-Api-Key-Name": "spoofed",
        "X_Auth_Subject": "spoofed",
        "x_auth_api_key_name": "spoofed",
        "X_Forwarded_For": "198.51.100.1",
        "X-Kept": "yes",
        "X_Kept_Too": "yes",
    }
    async with http.get(f"{gateway.url}/p/a/h", headers=headers) as response:
        seen = _headers(await response.json())

    assert seen["x-forwarded-for"] == ["203.0.113.7, 127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["x-forwarded-host"] == [f"127.0.0.1:{gateway.port}"]
    assert seen["x-kept"] == ["yes"]
    assert seen["x_kept_too"] == ["yes"]
    for name in ("x-drop-me", "keep-alive", "proxy-authorization", "te"):
        assert name not in seen
    assert [name for name in seen if name.startswith(("x-auth", "x_auth"))] == []
    assert "x_forwarded_for" not in seen
    assert seen.get("connection", ["keep-alive"]) == ["keep-alive"]


async def test_proxy_removes_hop_by_hop_response_headers(
    gateway: GatewayProcess, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{gateway.url}/p/a/hop") as response:
        assert response.status == 200
        assert await response.text() == "hop"
        assert response.headers["X-End-To-End"] == "kept"
        assert "X-Hop-Secret" not in response.headers
        assert "Keep-Alive" not in response.headers
        assert "Proxy-Authenticate" not in response.headers


async def test_proxy_passes_compressed_body_untouched(
    gateway: GatewayProcess, http: aiohttp.ClientSession
) -> None:
    async with http.get(
        f"{gateway.url}/p/a/gzip", headers={"Accept-Encoding": "gzip"}
    ) as response:
        raw = await response.read()
        assert response.headers["Content-Encoding"] == "gzip"

    assert gzip.decompress(raw) == b"compressed hello " * 20


async def test_proxy_streams_sse_events_as_they_arrive(
    gateway: GatewayProcess,
    upstream_agent: AgentProcess,
    http: aiohttp.ClientSession,
) -> None:
    async with http.get(f"{gateway.url}/p/a/sse/g1") as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        first = await response.content.readuntil(b"\n\n")
        assert first == b"data: first\n\n"

        # The agent sends the second event only now: the first one came
        # through before the stream was complete.
        async with http.get(f"{upstream_agent.url}/_release/g1") as release:
            assert release.status == 200
        second = await response.content.readuntil(b"\n\n")
        assert second == b"data: second\n\n"


async def test_proxy_sends_the_response_head_before_any_body_arrives(
    gateway: GatewayProcess,
    upstream_agent: AgentProcess,
    http: aiohttp.ClientSession,
) -> None:
    # The agent holds its body back until released: the caller must have
    # the status and headers meanwhile, as an SSE client expects.
    request = http.get(f"{gateway.url}/p/a/held/g2")
    async with await asyncio.wait_for(request, 10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        async with http.get(f"{upstream_agent.url}/_release/g2") as release:
            assert release.status == 200
        assert await response.read() == b"data: late\n\n"


async def test_proxy_streams_request_body_both_ways(
    gateway: GatewayProcess, http: aiohttp.ClientSession
) -> None:
    echoed = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"one;"
        await echoed.wait()
        yield b"two;"

    async with http.post(f"{gateway.url}/p/a/stream-back", data=body()) as response:
        assert response.status == 200
        first = await response.content.readexactly(4)
        assert first == b"one;"
        echoed.set()
        assert await response.content.read() == b"two;"


async def test_proxy_upstream_refusing_is_502(
    gateway_factory: GatewayFactory,
    redis_url: str,
    redis_store: Store,
    environment: str,
    http: aiohttp.ClientSession,
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    await commit_agent(redis_store, environment, "p", "down", closed)
    gateway = await gateway_factory(store=redis_url, environment=environment)

    async with http.get(f"{gateway.url}/p/down/x") as response:
        assert response.status == 502
        assert await response.json() == {
            "error": "bad_gateway",
            "message": "The agent could not be reached",
        }


async def test_proxy_silent_upstream_is_504_and_streams_may_outlast_timeout(
    gateway_factory: GatewayFactory,
    redis_url: str,
    redis_store: Store,
    environment: str,
    upstream_agent: AgentProcess,
    http: aiohttp.ClientSession,
) -> None:
    await commit_agent(
        redis_store, environment, "p", "a", upstream_agent.url, timeout_s=0.5
    )
    gateway = await gateway_factory(store=redis_url, environment=environment)

    async with http.get(f"{gateway.url}/p/a/sleep?s=3") as response:
        assert response.status == 504
        assert await response.json() == {
            "error": "gateway_timeout",
            "message": "The agent did not answer in time",
        }

    # 5 chunks 0.2 s apart: longer than 0.5 s in total, never silent that long.
    async with http.get(f"{gateway.url}/p/a/drip?count=5&gap=0.2") as response:
        assert response.status == 200
        assert await response.text() == "".join(f"chunk {i}\n" for i in range(5))


async def test_proxy_oversized_header_is_431_and_worker_keeps_serving(
    gateway: GatewayProcess, http: aiohttp.ClientSession
) -> None:
    secret = "s3cr3t-" + "x" * 17000
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(
        b"GET /p/a/x HTTP/1.1\r\nHost: gw\r\nX-Big: " + secret.encode() + b"\r\n\r\n"
    )
    await writer.drain()
    answer = await reader.read()
    writer.close()

    assert answer.split(b" ", 2)[1] == b"431"
    assert b"s3cr3t" not in answer
    assert b'"error":"header_too_large"' in answer

    async with http.get(
        f"{gateway.url}/p/a/x", headers={"X-Big": "y" * 16000}
    ) as response:
        assert response.status == 200


async def test_proxy_caller_disconnect_cancels_upstream(
    gateway: GatewayProcess,
    upstream_agent: AgentProcess,
    http: aiohttp.ClientSession,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(b"GET /p/a/sleep?s=30 HTTP/1.1\r\nHost: gw\r\n\r\n")
    await writer.drain()
    await _until_stat(http, upstream_agent, "started", 1)

    writer.transport.abort()
    await _until_stat(http, upstream_agent, "cancelled", 1)


async def _until_stat(
    http: aiohttp.ClientSession, agent: AgentProcess, name: str, value: int
) -> None:
    for _ in range(200):
        async with http.get(f"{agent.url}/_stats") as response:
            if (await response.json())[name] == value:
                return
        await asyncio.sleep(0.025)
    raise AssertionError(f"agent never reported {name}={value}")


async def test_proxy_hot_swaps_upstream_without_restart(
    gateway: GatewayProcess,
    redis_store: Store,
    environment: str,
    agent_factory: object,
    http: aiohttp.ClientSession,
) -> None:
    other = await agent_factory("other")  # type: ignore[operator]
    revision = await commit_agent(redis_store, environment, "p", "a", other.url)
    await _until_applied(redis_store, environment, revision)

    async with http.get(f"{gateway.url}/p/a/x") as response:
        assert (await response.json())["agent"] == "other"

    revision = await commit_agent(redis_store, environment, "p", "a", None)
    await _until_applied(redis_store, environment, revision)
    async with http.get(f"{gateway.url}/p/a/x") as response:
        assert response.status == 404


async def _until_applied(store: Store, environment: str, revision: int) -> None:
    """Wait until every live worker reports ``revision`` in its heartbeat."""
    for _ in range(200):
        workers = await store.workers(environment)
        if workers and all(w.revision >= revision for w in workers):
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"revision {revision} never applied")


async def test_proxy_sigterm_drains_a_stream_and_exits_zero(
    gateway: GatewayProcess,
    upstream_agent: AgentProcess,
    http: aiohttp.ClientSession,
) -> None:
    async with http.get(f"{gateway.url}/p/a/sse/drain") as response:
        assert await response.content.readuntil(b"\n\n") == b"data: first\n\n"
        gateway.terminate()
        await asyncio.sleep(0.3)

        # New connections are refused while the open stream still finishes.
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", gateway.port), timeout=1).close()
        async with http.get(f"{upstream_agent.url}/_release/drain"):
            pass
        assert await response.content.readuntil(b"\n\n") == b"data: second\n\n"

    assert await asyncio.to_thread(gateway.process.wait, 15) == 0


class _RawAgent:
    """An agent that records every byte it receives and answers each read."""

    def __init__(self) -> None:
        self.answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        self.received = bytearray()
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.closed_by_gateway = 0

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.writers.append(writer)
        while data := await reader.read(65536):
            self.received += data
            # The end of a head may be split across reads.
            if b"\r\n\r\n" in self.received[-len(data) - 3 :]:
                writer.write(self.answer)
        self.closed_by_gateway += 1
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in self.writers:
            writer.close()
            await writer.wait_closed()


@pytest.fixture
async def raw_agent() -> AsyncIterator[_RawAgent]:
    agent = _RawAgent()
    yield agent
    await agent.close()


async def _exchange(port: int, request: bytes) -> bytes:
    """Everything the gateway answers to ``request`` until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    answer = await reader.read()
    writer.close()
    return answer


_DATE = re.compile(
    rb"\r\nDate: [A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} [\d:]{8} GMT\r\n"
)


def _dated(answer: bytes) -> bytes:
    """``answer`` with the gateway's Date (there must be one) as ``NOW``."""
    dated, count = _DATE.subn(b"\r\nDate: NOW\r\n", answer)
    assert count == 1
    return dated


@pytest.mark.parametrize(
    ("sent", "received"),
    [
        (
            b"HTTP/1.1 200 OK\r\nX-Name: caf\xe9\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nX-Name: caf\xe9\r\nContent-Length: 2\r\n"
            b"Date: NOW\r\nConnection: close\r\n\r\nok",
        ),
        (
            b"HTTP/1.1 201 Made\r\nServer: agent/1\r\n"
            b"Date: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            b"HTTP/1.1 201 Made\r\nServer: agent/1\r\n"
            b"Date: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b"2\r\nok\r\n0\r\n\r\n",
        ),
        (
            b"HTTP/1.1 200 O\x01K\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n"
            b"Date: NOW\r\nConnection: close\r\n\r\n",
        ),
        (
            b"HTTP/1.1 200 OK\r\nX-Early: 1\r\nConnection: X-EARLY, keep-alive\r\n"
            b"Connection:  x-late \r\nX-Late: 2\r\nX-Kept: 3\r\n"
            b"Content-Length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nX-Kept: 3\r\nContent-Length: 2\r\n"
            b"Date: NOW\r\nConnection: close\r\n\r\nok",
        ),
        (
            b"HTTP/1.1 404 \r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n"
            b"Date: NOW\r\nConnection: close\r\n\r\n",
        ),
    ],
    ids=[
        "latin-1-value",
        "agent-date-and-server",
        "control-in-reason",
        "connection-names-more",
        "no-reason",
    ],
)
async def test_proxy_response_head_is_the_agents_byte_for_byte(
    raw_gateway: GatewayProcess,
    raw_agent: _RawAgent,
    sent: bytes,
    received: bytes,
) -> None:
    raw_agent.answer = sent
    gateway = raw_gateway

    request = b"GET /p/raw/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    answer = await _exchange(gateway.port, request)

    if b"Date: NOW" in received:
        answer = _dated(answer)
    assert answer == received


async def test_proxy_own_answers_do_not_name_the_server_software(
    gateway: GatewayProcess,
) -> None:
    request = b"GET /nowhere/at-all HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    body = b'{"error":"not_found","message":"No agent is deployed here"}'

    answer = _dated(await _exchange(gateway.port, request))

    assert answer == (
        b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nDate: NOW\r\nConnection: close\r\n\r\n%b"
        % (len(body), body)
    )


@pytest.fixture
async def raw_gateway(
    gateway_factory: GatewayFactory,
    redis_url: str,
    redis_store: Store,
    environment: str,
    raw_agent: _RawAgent,
) -> GatewayProcess:
    """A gateway with agent p/raw deployed on the raw agent."""
    await commit_agent(redis_store, environment, "p", "raw", await raw_agent.start())
    return await gateway_factory(store=redis_url, environment=environment)


async def test_proxy_closes_agent_connections_idle_for_the_configured_time(
    gateway_factory: GatewayFactory,
    redis_url: str,
    redis_store: Store,
    environment: str,
    raw_agent: _RawAgent,
) -> None:
    # Before the agent's own keep-alive would: a connection the agent closes
    # as the gateway reuses it would cost a request with a body its answer.
    await commit_agent(redis_store, environment, "p", "raw", await raw_agent.start())
    gateway = await gateway_factory(
        store=redis_url,
        environment=environment,
        extra_env={"AGW_UPSTREAM_IDLE_TIMEOUT_S": "0.2"},
    )
    request = b"GET /p/raw/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"

    assert _status(await _exchange(gateway.port, request)) == b"200 OK"
    for _ in range(200):  # 2 s: half the default idle timeout
        if raw_agent.closed_by_gateway:
            break
        await asyncio.sleep(0.01)
    assert (len(raw_agent.writers), raw_agent.closed_by_gateway) == (1, 1)

    assert _status(await _exchange(gateway.port, request)) == b"200 OK"
    assert len(raw_agent.writers) == 2  # a new connection


def _status(answer: bytes) -> bytes:
    """Status code and reason of an answer."""
    return answer.split(b"\r\n", 1)[0].split(b" ", 1)[1]


def _body(answer: bytes) -> bytes:
    return answer.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize(("count", "status"), [(20, b"200 OK"), (21, b"431")])
async def test_proxy_header_line_count_is_the_configured_one(
    gateway_factory: GatewayFactory,
    redis_url: str,
    redis_store: Store,
    environment: str,
    raw_agent: _RawAgent,
    count: int,
    status: bytes,
) -> None:
    await commit_agent(redis_store, environment, "p", "raw", await raw_agent.start())
    gateway = await gateway_factory(
        store=redis_url,
        environment=environment,
        extra_env={"AGW_MAX_HEADER_COUNT": "20"},
    )
    lines = b"".join(b"X-%d: v\r\n" % i for i in range(count - 2))
    request = b"GET /p/raw/x HTTP/1.1\r\nHost: gw\r\n%bConnection: close\r\n\r\n"

    answer = await _exchange(gateway.port, request % lines)

    assert _status(answer).startswith(status)
    if count > 20:
        assert _body(answer) == (
            b'{"error":"header_too_large",'
            b'"message":"The request has more header lines than the gateway accepts"}'
        )
    ok = await _exchange(gateway.port, request % b"")
    assert _status(ok) == b"200 OK"


def _line(length: int, shape: str) -> bytes:
    """A header line of ``length`` bytes, name, ": " and value."""
    if shape == "long-name":
        return b"X-" + b"n" * (length - len(b"X-: v")) + b": v"
    return b"X-Long: " + b"v" * (length - len(b"X-Long: "))


@pytest.mark.parametrize("length", [16384, 16385, 40000])
@pytest.mark.parametrize("shape", ["first-line", "later-line", "long-name"])
async def test_proxy_header_line_limit_counts_the_whole_line(
    raw_gateway: GatewayProcess, length: int, shape: str
) -> None:
    lines = [b"Host: gw", b"Connection: close", _line(length, shape)]
    if shape == "first-line":
        lines.reverse()
    request = b"GET /p/raw/x HTTP/1.1\r\n%b\r\n\r\n"

    answer = await _exchange(raw_gateway.port, request % b"\r\n".join(lines))

    if length <= 16384:
        assert _status(answer) == b"200 OK"
    else:
        assert _status(answer) == b"431 Request Header Fields Too Large"
        assert _body(answer) == (
            b'{"error":"header_too_large",'
            b'"message":"A request header line is longer than the gateway accepts"}'
        )
    ok = await _exchange(raw_gateway.port, request % b"Host: gw\r\nConnection: close")
    assert _status(ok) == b"200 OK"


@pytest.mark.parametrize("length", [16384, 16385])
async def test_proxy_request_target_limit_is_414(
    raw_gateway: GatewayProcess, length: int
) -> None:
    target = b"/p/raw/x?q=" + b"q" * (length - len(b"/p/raw/x?q="))
    request = b"GET %b HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n" % target

    answer = await _exchange(raw_gateway.port, request)

    if length <= 16384:
        assert _status(answer) == b"200 OK"
    else:
        assert _status(answer) == b"414 Request-URI Too Long"
        assert _body(answer) == (
            b'{"error":"uri_too_long",'
            b'"message":"The request target is longer than the gateway accepts"}'
        )
        assert b"qqqq" not in answer


@pytest.fixture
async def impatient_gateway(
    gateway_factory: GatewayFactory,
    redis_url: str,
    redis_store: Store,
    environment: str,
    upstream_agent: AgentProcess,
) -> GatewayProcess:
    """Agent p/a behind a gateway that waits 0.3 s for a head, 1 s when idle."""
    await commit_agent(redis_store, environment, "p", "a", upstream_agent.url)
    return await gateway_factory(
        store=redis_url,
        environment=environment,
        extra_env={"AGW_HEADER_TIMEOUT_S": "0.3", "AGW_KEEPALIVE_S": "1"},
    )


@pytest.mark.parametrize("trickle", [False, True], ids=["stalled", "trickled"])
async def test_proxy_request_head_not_complete_in_time_is_closed(
    impatient_gateway: GatewayProcess, trickle: bool
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", impatient_gateway.port)
    writer.write(b"GET /p/a/x HTTP/1.1\r\nHost: gw\r\n")

    async def more_lines() -> None:
        # A line now and then, as slowloris does: the bound still holds.
        with contextlib.suppress(ConnectionError):
            for _ in range(100):
                await asyncio.sleep(0.05)
                writer.write(b"X-More: 1\r\n")
                await writer.drain()

    sender = asyncio.create_task(more_lines()) if trickle else None
    try:
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        if sender is not None:
            sender.cancel()
        writer.close()


async def _response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """The status and body of one response with a Content-Length."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = re.search(rb"\r\nContent-Length: (\d+)\r\n", head)
    assert length is not None
    body = await reader.readexactly(int(length[1]))
    return head.split(b" ", 2)[1], body


async def test_proxy_idle_keepalive_connection_closes_after_the_configured_time(
    impatient_gateway: GatewayProcess,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", impatient_gateway.port)
    writer.write(b"GET /p/a/x HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert (await _response(reader))[0] == b"200"
    started = time.monotonic()

    # Closed by the sweep after 1 s idle (it runs each second), not after 75.
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert 1 <= time.monotonic() - started < 4


async def test_proxy_header_timeout_spares_idle_connections_and_slow_bodies(
    impatient_gateway: GatewayProcess,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", impatient_gateway.port)
    get = b"GET /p/a/x HTTP/1.1\r\nHost: gw\r\n\r\n"

    await asyncio.sleep(0.6)  # idle, twice the head timeout
    writer.write(get)
    assert (await _response(reader))[0] == b"200"

    writer.write(b"POST /p/a/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\n")
    await asyncio.sleep(0.6)  # the body comes late; the head was complete
    writer.write(b"hello")
    status, body = await _response(reader)
    assert status == b"200"
    assert msgspec.json.decode(body)["body"] == "hello"

    await asyncio.sleep(0.6)
    writer.write(get)
    assert (await _response(reader))[0] == b"200"
    writer.close()


async def test_proxy_gzip_request_body_goes_upstream_byte_for_byte(
    raw_gateway: GatewayProcess,
    raw_agent: _RawAgent,
    http: aiohttp.ClientSession,
) -> None:
    # Decoded, this body would end with a second request carrying a forged
    # identity header: it must reach the agent compressed, as one body.
    smuggled = (
        b"GET /admin HTTP/1.1\r\nHost: x\r\n"
        b"X-Auth-Api-Key-Name: admin\r\nContent-Length: 0\r\n\r\n"
    )
    body = gzip.compress(b"a" * 4096 + smuggled)
    gateway = raw_gateway

    headers = {"Content-Encoding": "gzip", "Content-Type": "text/plain"}
    async with http.post(
        f"{gateway.url}/p/raw/x", data=body, headers=headers
    ) as response:
        assert response.status == 200
        assert await response.read() == b"ok"

    head, _, sent = bytes(raw_agent.received).partition(b"\r\n\r\n")
    assert head.startswith(b"POST /x HTTP/1.1\r\n")
    assert f"\r\nContent-Length: {len(body)}".encode() in head
    assert b"\r\nContent-Encoding: gzip" in head
    assert sent == body
    assert b"/admin" not in raw_agent.received


async def test_proxy_agent_answer_before_the_body_ends_says_the_connection_closes(
    raw_gateway: GatewayProcess, raw_agent: _RawAgent, http: aiohttp.ClientSession
) -> None:
    # The agent answers on the head alone. A keep-alive caller told nothing
    # would send its next request on a connection about to close.
    reader, writer = await asyncio.open_connection("127.0.0.1", raw_gateway.port)
    writer.write(b"POST /p/raw/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 10\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.write(b"0123456789")
    rest = await asyncio.wait_for(reader.read(), 5)
    writer.close()

    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert head.endswith(b"\r\nConnection: close\r\n\r\n")
    assert rest == b"ok"
    # The next request, on a new connection as the caller was told.
    async with http.post(f"{raw_gateway.url}/p/raw/x", data=b"again") as response:
        assert response.status == 200
        assert await response.read() == b"ok"


async def test_proxy_invalid_gzip_request_body_is_passed_on_not_hung(
    raw_gateway: GatewayProcess,
    raw_agent: _RawAgent,
    http: aiohttp.ClientSession,
) -> None:
    gateway = raw_gateway

    headers = {"Content-Encoding": "gzip"}
    async with http.post(
        f"{gateway.url}/p/raw/x",
        data=b"not gzip",
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=5),
    ) as response:
        assert response.status == 200

    assert bytes(raw_agent.received).endswith(b"\r\n\r\nnot gzip")


async def _metric(
    http: aiohttp.ClientSession, url: str, name: str, **labels: str
) -> float:
    async with http.get(f"{url}/metrics") as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
    return 0.0


async def test_proxy_requests_reach_the_metrics_within_a_flush_interval(
    gateway: GatewayProcess, http: aiohttp.ClientSession
) -> None:
    for path in ("chat", "chat", "status/503"):
        async with http.get(f"{gateway.url}/p/a/{path}") as response:
            await response.read()
    async with http.get(f"{gateway.url}/nowhere/at-all") as response:
        assert response.status == 404

    requests = "agw_gateway_requests_total"
    expected = {("a", "200"): 2.0, ("a", "503"): 1.0, ("", "404"): 1.0}
    seen: dict[tuple[str, str], float] = {}
    for _ in range(40):  # up to 2 s: one flush interval and some slack
        for agent, status in expected:
            labels = {"agent": agent, "status": status}
            seen[(agent, status)] = await _metric(
                http, gateway.admin_url, requests, **labels
            )
        if seen == expected:
            break
        await asyncio.sleep(0.05)
    assert seen == expected
    latency = "agw_gateway_upstream_latency_seconds_count"
    assert await _metric(http, gateway.admin_url, latency, agent="a") == 3.0


@pytest.mark.parametrize(
    ("answer", "ending"),
    [
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nok\r\n0\r\n\r\n",
            b"\r\n\r\nok<EOF>",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"\r\n\r\nok<OPEN>"),
    ],
    ids=["unframed-closes", "framed-kept-alive"],
)
async def test_proxy_http10_caller_gets_a_body_it_can_delimit(
    raw_gateway: GatewayProcess,
    raw_agent: _RawAgent,
    answer: bytes,
    ending: bytes,
) -> None:
    raw_agent.answer = answer
    gateway = raw_gateway

    request = b"GET /p/raw/x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    got = await exchange_raw(gateway.port, request, 1.5, eof=b"<EOF>")
    assert got.startswith(b"HTTP/1.0 200 OK\r\n")
    assert got.endswith(ending)
    assert b"Transfer-Encoding" not in got


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9"])
async def test_proxy_other_http_versions_are_505(
    gateway: GatewayProcess, version: bytes
) -> None:
    got = await exchange_raw(
        gateway.port,
        b"GET /p/a/x " + version + b"\r\nHost: gw\r\n\r\n",
        1.5,
        eof=b"<EOF>",
    )
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split(b" ")[1] == b"505"
    assert body.removesuffix(b"<EOF>").removesuffix(b"<OPEN>") == (
        b'{"error":"http_version_not_supported",'
        b'"message":"Only HTTP/1.0 and 1.1 are served"}'
    )
