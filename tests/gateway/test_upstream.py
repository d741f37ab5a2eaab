"""The upstream client against small HTTP servers written here, on real sockets."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.upstream import (
    MAX_HEAD_SIZE,
    Origin,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
    _Connection,
)
from tests.fixtures.stack import free_port

UVLOOP = True  # the loop the gateway runs on (see tests/conftest.py)

Handler = Callable[["Peer"], Awaitable[None]]

GET = b"GET /x HTTP/1.1\r\nHost: agent\r\n\r\n"
HEAD = b"HEAD /x HTTP/1.1\r\nHost: agent\r\n\r\n"


class Peer:
    """One connection accepted by the test upstream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    async def head(self) -> bytes:
        """The next request head, or b"" once the client closed."""
        try:
            return await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return b""

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


class Upstream:
    """A raw HTTP/1.1 server; each connection runs ``handler``."""

    def __init__(self, handler: Handler, rcvbuf: int = 0) -> None:
        self.handler = handler
        self.rcvbuf = rcvbuf
        self.peers: list[Peer] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.closed = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.server = await asyncio.start_server(self._serve, sock=sock)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = Peer(reader, writer)
        self.peers.append(peer)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.append(task)
        try:
            await self.handler(peer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.closed += 1

    @property
    def origin(self) -> Origin:
        return Origin("http", "127.0.0.1", self.port)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for peer in self.peers:
            peer.writer.close()
        if self.tasks:
            await asyncio.wait(self.tasks)


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    pool = UpstreamPool()
    yield pool
    await pool.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Upstream]]]:
    started: list[Upstream] = []

    async def start(handler: Handler, rcvbuf: int = 0) -> Upstream:
        upstream = Upstream(handler, rcvbuf)
        await upstream.start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.stop()


def answering(*answers: bytes) -> Handler:
    """A keep-alive server that sends ``answers`` in turn, one per request."""

    async def handler(peer: Peer) -> None:
        for answer in answers:
            if not await peer.head():
                return
            await peer.send(answer)
        await peer.head()

    return handler


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
REUSED = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nreused"


def in_turn(*answers: bytes) -> Handler:
    """Connection n answers its first request with ``answers[n]``, later ones
    with ``REUSED``."""
    left = list(answers)

    async def handler(peer: Peer) -> None:
        answer = left.pop(0)
        while await peer.head():
            await peer.send(answer)
            answer = REUSED

    return handler


async def get(
    pool: UpstreamPool, upstream: Upstream, head: bytes = GET, timeout_s: float = 5
) -> UpstreamResponse:
    return await pool.request(
        upstream.origin,
        head,
        None,
        length=None,
        head_only=head.startswith(b"HEAD "),
        timeout_s=timeout_s,
    )


async def body_of(response: UpstreamResponse) -> bytes:
    parts = []
    while chunk := await response.read(5):
        parts.append(chunk)
    return b"".join(parts)


async def until(check: Callable[[], bool]) -> None:
    for _ in range(400):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


# -- response framing -----------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "body"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nhel\r\n2;ext=1\r\nlo\r\n0\r\nX-Trailer: t\r\n\r\n",
            b"hello",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b""),
    ],
)
async def test_upstream_framed_response_is_read_and_connection_reused(
    pool: UpstreamPool,
    serve: Callable[..., Awaitable[Upstream]],
    answer: bytes,
    body: bytes,
) -> None:
    upstream = await serve(answering(answer, answer))

    for _ in range(2):
        response = await get(pool, upstream)
        assert (response.status, response.reason) == (200, b"OK")
        assert await body_of(response) == body

    assert len(upstream.peers) == 1


async def test_upstream_close_delimited_response_ends_at_close(
    pool: UpstreamPool, serve: Callable[..., Awaitable[Upstream]]
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.head()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil ")
        await peer.send(b"close")

    upstream = await serve(handler)
    response = await get(pool, upstream)
    assert await body_of(response) == b"until close"
    assert response.headers == [(b"Content-Type", b"text/plain")]

    response = await get(pool, upstream)
    assert await body_of(response) == b"until close"
    assert len(upstream.peers) == 2


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    ],
)
async def test_upstream_connection_not_reused_when_framing_forbids(
    pool: UpstreamPool, serve: Callable[..., Awaitable[Upstream]], answer: bytes
) -> None:
    upstream = await serve(answering(answer, answer))

    for _ in range(2):
        assert await body_of(await get(pool, upstream)) == b"ok"

    assert len(upstream.peers) == 2


class FakeTransport:
    """Collects what the connection writes; delivers nothing by itself."""

    def __init__(self) -> None:
        self.written = b""
        self.paused = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written += data

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted


CHUNKED_SSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
    b"d\r\ndata: first\n\n\r\ne\r\ndata: second\n\n\r\n0\r\n\r\n"
)


@pytest.mark.parametrize("cut", range(1, len(CHUNKED_SSE)))
async def test_upstream_response_split_at_every_byte_boundary(cut: int) -> None:
    pool = UpstreamPool()
    conn = _Connection(pool, ("http", "agent", 80))
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    head = conn.begin(GET, head_only=False)

    conn.data_received(CHUNKED_SSE[:cut])
    conn.data_received(CHUNKED_SSE[cut:])

    response = head.result()
    assert response.status == 200
    assert response.headers == [
        (b"Content-Type", b"text/event-stream"),
        (b"Transfer-Encoding", b"chunked"),
    ]
    assert await body_of(response) == b"data: first\n\ndata: second\n\n"
    assert transport.written == GET
    assert conn.reusable()


async def test_upstream_trailers_never_reach_the_response_headers(
    pool: UpstreamPool, serve: Callable[..., Awaitable[Upstream]]
) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\nContent-Type: text/evil\r\nSet-Cookie: x=1\r\n\r\n"
    )
    upstream = await serve(answering(answer, answer))

    for _ in range(2):
        response = await get(pool, upstream)
        assert await body_of(response) == b"ok"
        assert response.headers == [(b"Transfer-Encoding", b"chunked")]

    assert len(upstream.peers) == 1


OK_2 = OK
STRAY = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nSet-Cookie: x=1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: 1\r\n",
    b"xyz",
]


@pytest.mark.parametrize("stray", STRAY, ids=["response", "half-head", "garbage"])
@pytest.mark.parametrize("same_read", [True, False], ids=["same-read", "later-read"])
async def test_upstream_bytes_after_the_response_are_ignored_and_never_pooled(
    stray: bytes, same_read: bool
) -> None:
    pool = UpstreamPool()
    conn = _Connection(pool, ("http", "agent", 80))
    conn.connection_made(FakeTransport())  # type: ignore[arg-type]
    head = conn.begin(GET, head_only=False)

    if same_read:
        conn.data_received(OK_2 + stray)
    else:
        conn.data_received(OK_2)
        conn.data_received(stray)

    response = head.result()
    assert response.headers == [(b"Content-Length", b"2")]
    assert await body_of(response) == b"ok"
    assert not conn.reusable()
    assert conn.closed


@pytest.mark.parametrize("stray", STRAY, ids=["response", "half-head", "garbage"])
async def test_upstream_stray_bytes_do_not_fail_the_next_request(
    pool: UpstreamPool, serve: Callable[..., Awaitable[Upstream]], stray: bytes
) -> None:
    hello = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    upstream = await serve(in_turn(OK_2 + stray, hello))

    assert await body_of(await get(pool, upstream)) == b"ok"
    assert await body_of(await get(pool, upstream)) == b"hello"
    assert len(upstream.peers) == 2


def head_of_size(size: int) -> bytes:
    """A response head of exactly ``size`` bytes announcing a 2-byte body."""
    start = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Pad: "
    return start + b"p" * (size - len(start) - 4) + b"\r\n\r\n"


@pytest.mark.parametrize("interim", [b"", b"HTTP/1.1 100 Continue\r\n\r\n"])
async def test_upstream_response_head_up_to_the_cap_is_accepted(
    pool: UpstreamPool, serve: Callable[..., Awaitable[Upstream]], interim: bytes
) -> None:
    answer = interim + head_of_size(MAX_HEAD_SIZE - len(interim)) + b"ok"
    upstream = await serve(answering(answer, answer))

    for _ in range(2):
        response = await get(pool, upstream)
        assert response.status == 200
        assert await body_of(response) == b"ok"
    assert len(upstream.peers) == 1


async def test_upstream_response_head_beyond_the_cap_fails_and_closes(
    pool: UpstreamPool, serve: Callable[..., Awaitable[Upstream]]
) -> None:
    upstream = await serve(answering(head_of_size(MAX_HEAD_SIZE + 1) + b"ok"))

    with pytest.raises(UpstreamError) as caught:
        await get(pool, upstream)
    assert type(caught.value) is UpstreamError
    assert str(caught.value) == "response head too large"
    await until(lambda: upstream.closed == 1)


async def test_upstream_endless_header_line_fails_without_waiting_for_timeout(
    pool: UpstreamPool, serve: Callable[..., Awaitable[Upstream]]
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.head()
        await peer.send(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        while True:
            await peer.send(b"a" * 4096)

    upstream = await serve(handler)
    with pytest.raises(UpstreamError) as caught:
        await get(pool, upstream, timeout_s=300)
    assert str(caught.value) == "response head too large"
    await until(lambda: upstream.closed == 1)


# -- responses without a body ----------------------------------------------------


async def test_upstream_head_response_has_no_body_and_connection_is_reused(
    pool: UpstreamPool, serve: Callable[..., Awaitable[Upstream]]
) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
    upstream = await serve(answering(head, OK))

    response = await get(pool, upstream, HEAD)
    assert response.status == 200
    assert (b"Content-Length", b"1000") in response.headers
    assert await body_of(response) == b""

    assert await body_of(await get(pool, upstream)) == b"ok"
    assert len(upstream.peers) == 1


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (b"HTTP/1.1 204 No Content\r\n\r\n", 204),
        (b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n', 304),
    ],
)
async def test_upstream_no_body_statuses_end_at_headers(
    pool: UpstreamPool,
    serve: Callable[..., Awaitable[Upstream]],
    answer: bytes,
    status: int,
) -> None:
    upstream = await serve(answering(answer, OK))

    response = await get(pool, upstream)
    assert response.status == status
    assert await body_of(response) == b""
    assert await body_of(await get(pool, upstream)) == b"ok"
    assert len(upstream.peers) == 1


async def test_upstream_interim_responses_are_skipped(
    pool: UpstreamPool, serve: Callable[..., Awaitable[Upstream]]
) -> None:
    answer = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone"
    )
    upstream = await serve(answering(answer))

    response = await get(pool, upstream)
    assert (response.status, response.reason) == (201, b"Created")
    assert response.headers == [(b"Content-Length", b"4")]
    assert await body_of(response) == b"done"


# -- the pool ---------------------------------------------------------------------


async def test_upstream_keep_alive_serves_many_requests_on_one_connection(
    pool: UpstreamPool, serve: Callable[..., Awaitable[Upstream]]
) -> None:
    seen: list[bytes] = []

    async def handler(peer: Peer) -> None:
        while head := await peer.head():
            seen.append(head)
            await peer.send(OK)

    upstream = await serve(handler)
    for _ in range(5):
        assert await body_of(await get(pool, upstream)) == b"ok"

    assert seen == [GET] * 5
    assert len(upstream.peers) == 1


async def test_upstream_pooled_connection_closed_while_idle_is_replaced(
    pool: UpstreamPool, serve: Callable[..., Awaitable[Upstream]]
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.head()
        await peer.send(OK)

    upstream = await serve(handler)
    assert await body_of(await get(pool, upstream)) == b"ok"
    await until(lambda: upstream.closed == 1)

    assert await body_of(await get(pool, upstream)) == b"ok"
    assert len(upstream.peers) == 2


async def test_upstream_pooled_connection_dead_on_reuse_is_retried_once(
    pool: UpstreamPool, serve: Callable[..., Awaitable[Upstream]]
) -> None:
    async def handler(peer: Peer) -> None:
        # Answers one request, then drops the connection as the next arrives:
        # what an agent closing an idle connection looks like to the reuser.
        await peer.head()
        await peer.send(OK)
        await peer.head()

    upstream = await serve(handler)
    assert await body_of(await get(pool, upstream)) == b"ok"
    assert await body_of(await get(pool, upstream)) == b"ok"
    assert len(upstream.peers) == 2


async def test_upstream_idle_time_counts_from_the_response_end_not_its_late_read(
    serve: Callable[..., Awaitable[Upstream]],
) -> None:
    keep_alive = 0.5  # the agent's, over the pool's idle timeout as advised

    async def handler(peer: Peer) -> None:
        loop = asyncio.get_running_loop()
        answered = None
        while head := await peer.head():
            if answered is not None and loop.time() - answered > keep_alive:
                # Its keep-alive ran out as the request came: closed
                # unanswered, as an agent's close racing a reuse looks.
                return
            if b"Content-Length: 2" in head:
                await peer.reader.readexactly(2)
            await peer.send(OK)
            answered = loop.time()

    upstream = await serve(handler)
    pool = UpstreamPool(idle_timeout=0.4)
    response = await get(pool, upstream)
    # A slow caller: the response is complete at the agent and in the
    # pool's buffer, but its end is read, and the connection released, late.
    await asyncio.sleep(0.3)
    assert await body_of(response) == b"ok"
    await asyncio.sleep(0.3)  # idle 0.6 s for the agent, 0.3 s since released
    parts = [b"hi", b""]

    async def read() -> bytes:
        return parts.pop(0)

    post = b"POST /x HTTP/1.1\r\nHost: agent\r\nContent-Length: 2\r\n\r\n"
    try:
        response = await pool.request(
            upstream.origin, post, read, length=2, head_only=False, timeout_s=5
        )
        assert await body_of(response) == b"ok"
    finally:
        await pool.close()
    assert len(upstream.peers) == 2  # a new connection, not the stale one


async def test_upstream_idle_connections_kept_in_the_order_their_responses_ended(
    serve: Callable[..., Awaitable[Upstream]],
) -> None:
    upstream = await serve(in_turn(OK, OK))
    pool = UpstreamPool(idle_timeout=0.4)
    early = await get(pool, upstream)  # ended now, read last
    await asyncio.sleep(0.3)
    assert await body_of(await get(pool, upstream)) == b"ok"
    assert await body_of(early) == b"ok"
    await asyncio.sleep(0.2)  # past the first one's idle timeout only

    try:
        # The connection idle for the shortest time is reused: the stale
        # one, released last, did not hide it.
        assert await body_of(await get(pool, upstream)) == b"reused"
    finally:
        await pool.close()
    assert len(upstream.peers) == 2


async def test_upstream_dead_connection_not_retried_once_body_was_sent(
    pool: UpstreamPool, serve: Callable[..., Awaitable[Upstream]]
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.head()
        await peer.send(OK)
        await peer.head()
        await peer.reader.readexactly(4)

    upstream = await serve(handler)
    assert await body_of(await get(pool, upstream)) == b"ok"

    parts = [b"body", b""]

    async def read() -> bytes:
        return parts.pop(0)

    post = b"POST /x HTTP/1.1\r\nHost: agent\r\nContent-Length: 4\r\n\r\n"
    with pytest.raises(UpstreamError) as caught:
        await pool.request(
            upstream.origin, post, read, length=4, head_only=False, timeout_s=5
        )
    assert type(caught.value) is not UpstreamTimeout
    assert len(upstream.peers) == 1


async def test_upstream_connection_limit_queues_requests(
    serve: Callable[..., Awaitable[Upstream]],
) -> None:
    async def handler(peer: Peer) -> None:
        while await peer.head():
            await peer.send(OK)

    upstream = await serve(handler)
    pool = UpstreamPool(connection_limit=1)

    async def one() -> bytes:
        return await body_of(await get(pool, upstream))

    assert await asyncio.gather(*(one() for _ in range(4))) == [b"ok"] * 4
    assert len(upstream.peers) == 1
    await pool.close()


async def test_upstream_at_the_limit_one_idle_connection_makes_room(
    serve: Callable[..., Awaitable[Upstream]],
) -> None:
    agents = [await serve(in_turn(OK)) for _ in range(4)]
    pool = UpstreamPool(connection_limit=3)
    for agent in agents[:3]:
        assert await body_of(await get(pool, agent)) == b"ok"

    assert await body_of(await get(pool, agents[3])) == b"ok"

    await until(lambda: agents[0].closed == 1)  # the oldest idle one
    await asyncio.sleep(0.05)
    assert [agent.closed for agent in agents] == [1, 0, 0, 0]
    assert [len(pool._idle[agent.origin.key]) for agent in agents] == [0, 1, 1, 1]
    await pool.close()


async def test_upstream_idle_connection_expires(
    serve: Callable[..., Awaitable[Upstream]],
) -> None:
    upstream = await serve(answering(OK))
    pool = UpstreamPool(idle_timeout=0.05)

    assert await body_of(await get(pool, upstream)) == b"ok"
    await until(lambda: upstream.closed == 1)
    await pool.close()


async def test_upstream_idle_connections_expire_each_in_its_own_time(
    serve: Callable[..., Awaitable[Upstream]],
) -> None:
    upstream = await serve(in_turn(OK, OK))
    pool = UpstreamPool(idle_timeout=1.0)

    async def one() -> bytes:
        return await body_of(await get(pool, upstream))

    # Two connections go idle together; one is reused half-way.
    assert await asyncio.gather(one(), one()) == [b"ok", b"ok"]
    await asyncio.sleep(0.5)
    assert await one() == b"reused"

    await until(lambda: upstream.closed == 1)  # the one left idle, at 1 s
    assert await one() == b"reused"  # the other one: idle for 0.5 s only
    assert len(upstream.peers) == 2
    await until(lambda: upstream.closed == 2)
    await pool.close()


async def test_upstream_sweep_never_runs_again_before_the_clock_moves(
    serve: Callable[..., Awaitable[Upstream]],
) -> None:
    upstream = await serve(in_turn(OK))
    pool = UpstreamPool(idle_timeout=30.0)
    assert await body_of(await get(pool, upstream)) == b"ok"
    assert pool._sweeper is not None
    pool._sweeper.cancel()  # the sweep set at the release; this test runs its own
    sweeps = 0
    sweep = pool._sweep

    def counted() -> None:
        nonlocal sweeps
        sweeps += 1
        sweep()

    pool._sweep = counted  # type: ignore[method-assign]
    (idle,) = pool._idle[upstream.origin.key]
    # Due within the loop's millisecond: sooner than any timer can be set.
    idle.idle_since = asyncio.get_running_loop().time() - 30.0 + 0.0003

    counted()
    for _ in range(50):
        await asyncio.sleep(0)
    # Set again for a moment the loop's millisecond clock can tell: a delay
    # that rounds to nothing would run it on each of those 50 turns.
    assert sweeps <= 2
    await pool.close()


async def test_upstream_connection_idle_too_long_is_not_reused(
    serve: Callable[..., Awaitable[Upstream]],
) -> None:
    upstream = await serve(in_turn(OK, OK))
    pool = UpstreamPool(idle_timeout=30.0)

    assert await body_of(await get(pool, upstream)) == b"ok"
    (idle,) = pool._idle[upstream.origin.key]
    idle.idle_since -= 31  # as if its expiry were due and had not run yet

    assert await body_of(await get(pool, upstream)) == b"ok"  # a new connection
    assert len(upstream.peers) == 2
    await until(lambda: upstream.closed == 1)
    assert idle.closed
    await pool.close()


# -- failures ---------------------------------------------------------------------


async def test_upstream_refusing_is_an_error_not_a_timeout(pool: UpstreamPool) -> None:
    origin = Origin("http", "127.0.0.1", free_port())
    with pytest.raises(UpstreamError) as caught:
        await pool.request(origin, GET, None, length=None, head_only=False, timeout_s=5)
    assert type(caught.value) is UpstreamError


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 2OO OK\r\n\r\n",
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
        b"HTTP/1.1 099 Low\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 000 Zero\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\nok",
    ],
)
async def test_upstream_malformed_response_is_an_error(
    pool: UpstreamPool, serve: Callable[..., Awaitable[Upstream]], answer: bytes
) -> None:
    upstream = await serve(answering(answer))
    with pytest.raises(UpstreamError) as caught:
        await body_of(await get(pool, upstream))
    assert type(caught.value) is UpstreamError


async def silent(peer: Peer) -> None:
    """Reads a request and never answers it."""
    await peer.head()
    await peer.head()


async def test_upstream_silent_before_headers_times_out(
    pool: UpstreamPool, serve: Callable[..., Awaitable[Upstream]]
) -> None:
    upstream = await serve(silent)
    with pytest.raises(UpstreamTimeout):
        await get(pool, upstream, timeout_s=0.2)
    await until(lambda: upstream.closed == 1)


async def test_upstream_stream_silent_between_chunks_is_cut(
    pool: UpstreamPool, serve: Callable[..., Awaitable[Upstream]]
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.head()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        await peer.head()

    upstream = await serve(handler)
    response = await get(pool, upstream, timeout_s=5)
    assert await response.read(5) == b"hello"
    with pytest.raises(UpstreamTimeout):
        await response.read(0.2)
    await until(lambda: upstream.closed == 1)


async def test_upstream_earlier_deadline_moves_the_alarm_and_later_one_keeps(
    pool: UpstreamPool, serve: Callable[..., Awaitable[Upstream]]
) -> None:
    upstream = await serve(silent)
    slow = asyncio.ensure_future(get(pool, upstream, timeout_s=1.0))
    await until(lambda: len(upstream.peers) == 1)
    # Due before the alarm set for the first request: without moving the
    # alarm it would wait for that one, 5 s here.
    with pytest.raises(UpstreamTimeout):
        await asyncio.wait_for(get(pool, upstream, timeout_s=0.1), 5)

    # The alarm that rang for the second request left the first alone.
    assert not slow.done()
    with pytest.raises(UpstreamTimeout):
        await asyncio.wait_for(slow, 5)


async def test_upstream_stale_alarm_never_cuts_a_stream_still_in_time(
    pool: UpstreamPool, serve: Callable[..., Awaitable[Upstream]]
) -> None:
    async def late_body(peer: Peer) -> None:
        await peer.head()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        await asyncio.sleep(0.4)
        await peer.send(b"hello")
        await peer.head()

    upstream = await serve(late_body)
    # The alarm set for this head rings at 0.1 s, while the body may take 5.
    response = await get(pool, upstream, timeout_s=0.1)

    assert await body_of(response) == b"hello"


async def test_upstream_requests_of_one_timeout_share_one_timer(
    pool: UpstreamPool, serve: Callable[..., Awaitable[Upstream]]
) -> None:
    upstream = await serve(answering(OK))
    await body_of(await get(pool, upstream, timeout_s=60))
    alarm = pool._alarm

    for _ in range(5):
        assert await body_of(await get(pool, upstream, timeout_s=60)) == b"ok"

    assert alarm is not None and pool._alarm is alarm


async def test_upstream_closing_mid_body_is_an_error_never_a_short_body(
    pool: UpstreamPool, serve: Callable[..., Awaitable[Upstream]]
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.head()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")

    upstream = await serve(handler)
    response = await get(pool, upstream)
    received = b""
    with pytest.raises(UpstreamError) as caught:
        while True:
            received += await response.read(5)
    assert type(caught.value) is UpstreamError
    assert received == b"hello"


async def test_upstream_reset_during_close_delimited_body_is_an_error(
    pool: UpstreamPool, serve: Callable[..., Awaitable[Upstream]]
) -> None:
    sent = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.head()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart")
        await sent.wait()
        # Linger 0: the close is a reset (RST), not an end of stream (FIN).
        sock = peer.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.writer.transport.abort()

    upstream = await serve(handler)
    response = await get(pool, upstream)
    assert await response.read(5) == b"part"
    sent.set()
    with pytest.raises(UpstreamError) as caught:
        await response.read(5)
    assert type(caught.value) is UpstreamError


# -- streaming and flow control --------------------------------------------------


async def test_upstream_sse_events_arrive_one_by_one(
    pool: UpstreamPool, serve: Callable[..., Awaitable[Upstream]]
) -> None:
    second = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.head()
        await peer.send(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\nd\r\ndata: first\n\n\r\n"
        )
        await second.wait()
        await peer.send(b"e\r\ndata: second\n\n\r\n0\r\n\r\n")
        await peer.head()

    upstream = await serve(handler)
    response = await get(pool, upstream)
    assert await response.read(5) == b"data: first\n\n"
    second.set()
    assert await response.read(5) == b"data: second\n\n"
    assert await response.read(5) == b""


async def test_upstream_slow_reader_pauses_the_agent(
    pool: UpstreamPool, serve: Callable[..., Awaitable[Upstream]]
) -> None:
    size = 16 * 1024 * 1024
    sent = 0

    async def handler(peer: Peer) -> None:
        nonlocal sent
        await peer.head()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"x" * 65536
        while sent < size:
            await peer.send(block)
            sent += len(block)
        await peer.head()

    upstream = await serve(handler)
    response = await get(pool, upstream)
    conn = response._conn
    await until(lambda: conn.reading_paused)
    # The agent is held back by the kernel's buffers, not by our memory.
    for _ in range(50):
        await asyncio.sleep(0)
    assert conn.buffered < 512 * 1024
    assert sent < size

    assert len(await body_of(response)) == size
    assert len(upstream.peers) == 1


async def test_upstream_abandoned_response_closes_the_agent_connection(
    pool: UpstreamPool, serve: Callable[..., Awaitable[Upstream]]
) -> None:
    eof = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.head()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await peer.send(b"5\r\nfirst\r\n")
        assert await peer.reader.read() == b""
        eof.set()

    upstream = await serve(handler)
    response = await get(pool, upstream)
    assert await response.read(5) == b"first"
    response.close()
    await eof.wait()
    assert upstream.closed == 1


async def test_upstream_cancelled_request_closes_the_agent_connection(
    pool: UpstreamPool, serve: Callable[..., Awaitable[Upstream]]
) -> None:
    got = asyncio.Event()
    eof = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.head()
        got.set()
        assert await peer.reader.read() == b""
        eof.set()

    upstream = await serve(handler)
    task = asyncio.create_task(get(pool, upstream))
    await got.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eof.wait()
    assert len(upstream.peers) == 1


@pytest.mark.parametrize(
    ("length", "framing", "wire"),
    [
        (10, b"Content-Length: 10\r\n", b"hellothere"),
        (
            None,
            b"Transfer-Encoding: chunked\r\n",
            b"5\r\nhello\r\n5\r\nthere\r\n0\r\n\r\n",
        ),
    ],
)
async def test_upstream_request_body_is_framed_as_announced(
    pool: UpstreamPool,
    serve: Callable[..., Awaitable[Upstream]],
    length: int | None,
    framing: bytes,
    wire: bytes,
) -> None:
    received = asyncio.Future[bytes]()

    async def handler(peer: Peer) -> None:
        await peer.head()
        received.set_result(await peer.reader.readexactly(len(wire)))
        await peer.send(OK)
        while await peer.head():
            await peer.send(OK)

    upstream = await serve(handler)
    parts = [b"hello", b"there", b""]

    async def read() -> bytes:
        return parts.pop(0)

    head = b"POST /x HTTP/1.1\r\nHost: agent\r\n" + framing + b"\r\n"
    response = await pool.request(
        upstream.origin, head, read, length=length, head_only=False, timeout_s=5
    )
    assert await body_of(response) == b"ok"
    assert await received == wire

    assert await body_of(await get(pool, upstream)) == b"ok"
    assert len(upstream.peers) == 1


async def test_upstream_large_request_body_is_streamed_not_buffered(
    pool: UpstreamPool, serve: Callable[..., Awaitable[Upstream]]
) -> None:
    size = 10 * 1024 * 1024
    block = b"y" * 65536
    produced = 0
    snapshot = -1

    async def handler(peer: Peer) -> None:
        nonlocal snapshot
        await peer.head()
        # Read nothing for a while: a client with flow control is held back.
        for _ in range(200):
            await asyncio.sleep(0)
        snapshot = produced
        total = 0
        while total < size:
            total += len(await peer.reader.read(1 << 20))
        await peer.send(
            b"HTTP/1.1 200 OK\r\nX-Received: %d\r\nContent-Length: 0\r\n\r\n" % total
        )
        await peer.head()

    upstream = await serve(handler, rcvbuf=65536)

    async def read() -> bytes:
        nonlocal produced
        if produced >= size:
            return b""
        produced += len(block)
        return block

    head = b"PUT /x HTTP/1.1\r\nHost: agent\r\nContent-Length: %d\r\n\r\n" % size
    response = await pool.request(
        upstream.origin, head, read, length=size, head_only=False, timeout_s=30
    )
    assert response.headers == [
        (b"X-Received", str(size).encode()),
        (b"Content-Length", b"0"),
    ]
    assert await body_of(response) == b""
    assert 0 < snapshot < size


@pytest.mark.parametrize(
    ("parts", "sent"),
    [
        ([b"hello", b"there!", b""], b"hello"),
        ([b"hell", b""], b"hell"),
    ],
    ids=["longer", "shorter"],
)
async def test_upstream_body_not_matching_its_length_fails_and_closes(
    pool: UpstreamPool,
    serve: Callable[..., Awaitable[Upstream]],
    parts: list[bytes],
    sent: bytes,
) -> None:
    received = bytearray()
    closed = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.head()
        while data := await peer.reader.read(65536):
            received.extend(data)
        closed.set()

    upstream = await serve(handler)

    async def read() -> bytes:
        return parts.pop(0)

    head = b"POST /x HTTP/1.1\r\nHost: agent\r\nContent-Length: 10\r\n\r\n"
    with pytest.raises(UpstreamError) as caught:
        await pool.request(
            upstream.origin, head, read, length=10, head_only=False, timeout_s=5
        )
    assert type(caught.value) is UpstreamError
    await asyncio.wait_for(closed.wait(), 5)
    assert bytes(received) == sent
