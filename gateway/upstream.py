"""The gateway's HTTP/1.1 client to agents: pooled keep-alive connections.

Proxying is what the gateway exists for, and a general-purpose client spent
most of a request's CPU. This one does only what a proxy needs: it sends a
request head the caller serialized once, streams the request body, parses
the response with llhttp (``httptools``) and hands the body on as it arrives,
pausing the agent's socket while the caller is slow. A connection goes back
to its pool only after a complete response whose framing allows reuse, and
only if not one byte came after that response.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import operator
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, cast

import httptools

__all__ = [
    "IDLE_TIMEOUT_S",
    "NO_BODY_STATUS",
    "MAX_HEAD_SIZE",
    "BodyReader",
    "Origin",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamResponse",
    "UpstreamTimeout",
]

#: Reads the next piece of the request body; ``b""`` once it is complete.
BodyReader = Callable[[], Awaitable[bytes]]

# Response bytes buffered for a slow caller before the agent's socket is
# paused; it is resumed as soon as the caller has taken them.
_HIGH_WATER = 256 * 1024

#: How long a pooled connection may stay idle before the pool closes it. An
#: agent that closes an idle connection first races the next request sent on
#: it: a request whose body was already sent is not sent again (it may not be
#: idempotent), and its caller gets a 502. So the default is under the 5 s
#: keep-alive of uvicorn, hypercorn and Node.js servers.
IDLE_TIMEOUT_S = 4.0

#: Final statuses whose responses have no body, whatever their headers say.
NO_BODY_STATUS = frozenset({204, 304})

# The most an agent may send before its response head is complete (status
# line, header lines, and any interim 1xx answers before it). Without a cap,
# an endless header line would grow the worker's memory until the timeout.
MAX_HEAD_SIZE = 64 * 1024

# The deadline of a connection that awaits nothing from its agent.
_NEVER = math.inf

# The order of a pool's idle lists.
_IDLE_SINCE = operator.attrgetter("idle_since")


class UpstreamError(Exception):
    """The agent could not be reached, or broke the exchange."""


class UpstreamTimeout(UpstreamError):
    """The agent was silent for longer than the route allows."""


class _DeadConnection(UpstreamError):
    """A pooled connection closed before any byte of its response arrived."""


class _StrayMessage(Exception):
    """A second message began after the response: the parse stops there."""


class Origin:
    """Where a route's connections go: scheme, host and port."""

    __slots__ = ("host", "key", "port", "tls")

    def __init__(self, scheme: str, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.tls = scheme == "https"
        self.key = (scheme, host, port)


class _Connection(asyncio.Protocol):
    """One upstream connection and the exchange in progress on it."""

    # Slots, as every request reads and writes these (see traffic._Connection).
    __slots__ = (
        "_drain",
        "_write_paused",
        "any_bytes",
        "body_done",
        "body_started",
        "buffered",
        "chunks",
        "closed",
        "deadline",
        "done",
        "error",
        "framed",
        "head",
        "head_only",
        "head_size",
        "headers",
        "idle_since",
        "keep_alive",
        "key",
        "loop",
        "parser",
        "pool",
        "reading_paused",
        "reason",
        "response",
        "reused",
        "sender",
        "stale_parser",
        "transport",
        "waiter",
    )

    def __init__(self, pool: UpstreamPool, key: tuple[str, str, int]) -> None:
        self.pool = pool
        self.key = key
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        # Loop time its last response ended: the agent's keep-alive clock
        # starts then, however late the caller reads the end.
        self.idle_since = 0.0
        # Loop time by which the agent must have sent something: its response
        # head, or more body while a read waits. The pool's alarm enforces it.
        self.deadline = _NEVER
        self.reused = False
        self.sender: asyncio.Task[None] | None = None
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._reset_exchange(False)

    def _reset_exchange(self, head_only: bool) -> None:
        self.head_only = head_only
        self.head: asyncio.Future[UpstreamResponse] | None = None
        self.response: UpstreamResponse | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.any_bytes = False
        self.head_size = 0
        self.framed = False
        self.done = False
        self.keep_alive = False
        self.error: UpstreamError | None = None
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.reading_paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.body_started = False
        self.body_done = True
        self.stale_parser = False

    # --- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.head is None:
            # Bytes on an idle connection: it can no longer be trusted.
            self.close()
            return
        self._receive(data)

    def _receive(self, data: bytes | memoryview) -> None:
        if self.done:
            # Bytes beyond the end of the response: the response stands, but
            # the stream is out of step and the connection is never reused.
            self.keep_alive = False
            return
        self.any_bytes = True
        if self.response is None and self.head_size + len(data) > MAX_HEAD_SIZE:
            self._feed_past_cap(data)
            return
        self._feed(data)
        if self.response is None:
            self.head_size += len(data)

    def _feed_past_cap(self, data: bytes | memoryview) -> None:
        """Feed the head up to the cap; fail if it is not complete by then."""
        room = MAX_HEAD_SIZE - self.head_size
        view = memoryview(data)
        self._feed(view[:room])
        if self.response is not None:
            self._receive(view[room:])
        elif self.error is None:
            self._fail(UpstreamError("response head too large"))
            self.close()

    def _feed(self, data: bytes | memoryview) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.done:
                # What follows a complete response (see on_message_begin).
                self.keep_alive = False
            else:
                self._fail(UpstreamError("malformed response"))
                self.close()
        if self.stale_parser:
            # A HEAD answer ends with its headers, whatever they announce.
            self.parser = httptools.HttpResponseParser(self)
            self.stale_parser = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._lost(self)
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(UpstreamError("connection lost"))
        if self.head is None or self.done:
            return
        if self.response is None:
            if self.reused and not self.any_bytes:
                self._fail(_DeadConnection("pooled connection was closed"))
            else:
                self._fail(UpstreamError("connection closed before a response"))
        elif not self.framed and exc is None:
            # Read-until-close framing: a clean close is the end of the body;
            # a reset is not, and must not pass for one.
            self.done = True
            self._wake()
        else:
            self._fail(UpstreamError("connection closed mid-body"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # --- httptools callbacks --------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done:
            # A second response in the same read as the end of the first:
            # none was asked for, so nothing of it may reach the caller.
            raise _StrayMessage

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        # Fields after the head are trailers of a chunked body: dropped, as
        # the gateway does not forward trailers, and the caller's head holds
        # the list that was complete at on_headers_complete.
        if self.response is None:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 100:
            raise UpstreamError("invalid status code")
        if status < 200:
            if status == 101:
                raise UpstreamError("unexpected protocol switch")
            # An interim answer: the final one follows on the same stream.
            self.headers = []
            self.reason = b""
            return
        self.framed = _framed(self.headers)
        response = UpstreamResponse(self, status, self.reason, self.headers)
        self.response = response
        if self.head_only or status in NO_BODY_STATUS:
            self.framed = True
        if self.head_only:
            self.done = True
            self.idle_since = self.loop.time()
            self.keep_alive = self.parser.should_keep_alive()
            self.stale_parser = True
        assert self.head is not None
        if not self.head.done():
            self.head.set_result(response)

    def on_body(self, body: bytes) -> None:
        if self.done:
            # Bytes after a HEAD answer: the stream is out of step.
            self.keep_alive = False
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.reading_paused:
            self.reading_paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.response is None or self.done:
            return
        self.done = True
        self.idle_since = self.loop.time()
        self.keep_alive = self.framed and self.parser.should_keep_alive()
        self._wake()

    # --- the exchange ---------------------------------------------------------

    def begin(self, head: bytes, head_only: bool) -> asyncio.Future[UpstreamResponse]:
        self._reset_exchange(head_only)
        fut: asyncio.Future[UpstreamResponse] = self.loop.create_future()
        self.head = fut
        assert self.transport is not None
        self.transport.write(head)
        return fut

    def _fail(self, error: UpstreamError) -> None:
        self.error = error
        if self.head is not None and not self.head.done():
            self.head.set_exception(error)
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take(self) -> bytes:
        """Every body byte received so far."""
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks = []
        self.buffered = 0
        if self.reading_paused:
            self.reading_paused = False
            if self.transport is not None:
                self.transport.resume_reading()
        return data

    async def wait(self, silence_s: float) -> None:
        """Until more body, the end, or an error; silence is a timeout."""
        waiter: asyncio.Future[None] = self.loop.create_future()
        self.waiter = waiter
        self.pool._watch(self, self.loop.time() + silence_s)
        try:
            await waiter
        finally:
            self.deadline = _NEVER
            self.waiter = None

    def expire(self) -> None:
        """The deadline has passed: what is awaited fails with a timeout."""
        self.deadline = _NEVER
        awaited = self.waiter if self.waiter is not None else self.head
        if awaited is not None:
            _expire(awaited)

    async def drain(self) -> None:
        if self.closed:
            raise UpstreamError("connection lost")
        if self._write_paused:
            self._drain = self.loop.create_future()
            await self._drain

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            raise UpstreamError("connection lost")
        self.transport.write(data)

    def reusable(self) -> bool:
        return (
            self.done
            and self.keep_alive
            and self.body_done
            and self.error is None
            and not self.closed
        )

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self.closed = True


def _framed(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a response announces its length (Content-Length or chunked).

    A transfer coding other than chunked alone is refused: the gateway drops
    Transfer-Encoding as hop-by-hop, so a gzip coding, say, would reach the
    caller undecoded with nothing to say so.
    """
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-length":
            return True
        if lower == b"transfer-encoding":
            if value.strip().lower() != b"chunked":
                raise UpstreamError("transfer coding other than chunked")
            return True
    return False


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout("the agent was silent too long"))


class UpstreamResponse:
    """An agent's response head; the body is read piece by piece."""

    __slots__ = ("_conn", "_open", "headers", "reason", "status")

    def __init__(
        self,
        conn: _Connection,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        self._conn = conn
        self._open = True
        self.status = status
        self.reason = reason
        self.headers = headers

    @property
    def ended(self) -> bool:
        """Nothing more will arrive: what is buffered is the rest of the body."""
        return self._conn.done and self._conn.error is None

    @property
    def readable(self) -> bool:
        """A read would answer at once: body, its end or an error is in."""
        conn = self._conn
        return bool(conn.chunks) or conn.done or conn.error is not None

    async def read(self, silence_s: float) -> bytes:
        """The body received since the last read; ``b""`` at its end.

        Raises UpstreamError when the agent breaks off mid-body or is silent
        for ``silence_s`` seconds: the caller must then cut its own connection,
        never end the body as if it were complete.
        """
        conn = self._conn
        while True:
            if conn.chunks or conn.done or conn.error is not None:
                return self.read_ready()
            try:
                await conn.wait(silence_s)
            except BaseException:
                self.close()
                raise

    def read_ready(self) -> bytes:
        """What :meth:`read` answers when :attr:`readable`, without a coroutine."""
        conn = self._conn
        if conn.chunks:
            return conn.take()
        if conn.error is not None:
            self.close()
            raise conn.error
        self._finish()  # done
        return b""

    def _finish(self) -> None:
        conn = self._conn
        self._open = False
        if conn.reusable():
            conn.pool._release(conn)
        else:
            conn.pool._discard(conn)

    def close(self) -> None:
        """Abandon the response: its connection is closed, never pooled."""
        if self._open:
            self._open = False
            self._conn.pool._discard(self._conn)


class UpstreamPool:
    """Keep-alive connections of one worker, by (scheme, host, port)."""

    def __init__(
        self, *, connection_limit: int = 0, idle_timeout: float = IDLE_TIMEOUT_S
    ):
        self._limit = connection_limit
        self._idle_timeout = idle_timeout
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._open = 0
        self._all: set[_Connection] = set()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._ssl: ssl.SSLContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        # One timer for every deadline of the pool's connections, due at the
        # earliest of them or before: a timer started and cancelled for each
        # request cost some 4,000 instructions (see _ring).
        self._alarm: asyncio.TimerHandle | None = None
        self._alarm_at = _NEVER

    async def request(
        self,
        origin: Origin,
        head: bytes,
        body: BodyReader | None,
        *,
        length: int | None,
        head_only: bool,
        timeout_s: float,
    ) -> UpstreamResponse:
        """Send a request; its response once the headers are in.

        ``head`` is the serialized request head, framing headers included;
        ``body`` is read until ``b""``: exactly ``length`` bytes, or sent
        chunked when ``length`` is None. Connect and response headers must
        come within ``timeout_s`` seconds.
        """
        loop = self._loop
        if loop is None:
            # Once: asyncio.get_running_loop() costs a getpid() system call.
            loop = self._loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        fresh = False
        while True:
            # An idle connection without the coroutine of _acquire, and the
            # exchange in this coroutine: each layer costs every request.
            conn = None if fresh else self._take_idle(origin.key)
            if conn is None:
                conn = await self._acquire(origin, deadline, fresh=fresh)
            fut = self._begin(conn, head, body, length, head_only, deadline)
            try:
                response = await fut
            except BaseException as exc:
                conn.deadline = _NEVER
                self._discard(conn)  # and the body's sender with it
                if fresh or not isinstance(exc, _DeadConnection) or conn.body_started:
                    raise
                # The agent closed an idle connection as it was reused;
                # nothing of the body was consumed, so the request can go
                # again, once.
                fresh = True
                continue
            conn.deadline = _NEVER
            return response

    def _begin(
        self,
        conn: _Connection,
        head: bytes,
        body: BodyReader | None,
        length: int | None,
        head_only: bool,
        deadline: float,
    ) -> asyncio.Future[UpstreamResponse]:
        """Send the head and start the body: the response head, by the deadline."""
        fut = conn.begin(head, head_only)
        if body is not None:
            conn.body_done = False
            sender = conn.loop.create_task(_send_body(conn, body, length))
            sender.add_done_callback(lambda task: _sent(conn, task))
            conn.sender = sender
        self._watch(conn, deadline)
        return fut

    def _watch(self, conn: _Connection, deadline: float) -> None:
        """Hold ``conn`` to ``deadline``; the alarm is moved only to be earlier."""
        conn.deadline = deadline
        if deadline < self._alarm_at:
            self._arm(conn.loop, deadline)

    def _arm(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        if self._alarm is not None:
            self._alarm.cancel()
        self._alarm_at = at
        # At least the loop's 1 ms tick, as for the sweep; call_later, as
        # uvloop's call_at is call_later with more steps.
        self._alarm = loop.call_later(max(at - loop.time(), 0.001), self._ring)

    def _ring(self) -> None:
        """Fail what is past its deadline; set the alarm for the next one.

        Requests of one route share a timeout, so a later request has a
        later deadline: the alarm rarely moves, and rings about once per
        timeout while the pool is busy, each time looking at every
        connection. Their number is the worker's concurrency, not its rate.
        """
        self._alarm = None
        self._alarm_at = _NEVER
        loop = asyncio.get_running_loop()
        now = loop.time()
        next_at = _NEVER
        for conn in tuple(self._all):
            deadline = conn.deadline
            if deadline <= now:
                conn.expire()
            elif deadline < next_at:
                next_at = deadline
        if next_at < _NEVER:
            self._arm(loop, next_at)

    async def _acquire(
        self, origin: Origin, deadline: float, *, fresh: bool
    ) -> _Connection:
        """A new connection, or one freed while waiting at the limit.

        request() has looked for an idle one already.
        """
        try:
            async with asyncio.timeout_at(deadline):
                while self._limit and self._open >= self._limit:
                    # At the cap: a connection of ours freed meanwhile is
                    # reused; an idle one of another agent makes room.
                    if not fresh:
                        conn = self._take_idle(origin.key)
                        if conn is not None:
                            return conn
                    if not self._close_oldest_idle():
                        await self._wait_room()
                return await self._connect(origin)
        except TimeoutError:
            raise UpstreamTimeout("connect timed out") from None

    def _take_idle(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()  # the one idle for the shortest time
            if conn.idle_since + self._idle_timeout <= conn.loop.time():
                # Idle too long, and the others longer.
                for stale in (*idle, conn):
                    self._discard(stale)
                idle.clear()
                return None
            if not conn.closed:
                conn.reused = True
                return conn
        return None

    async def _wait_room(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _close_oldest_idle(self) -> bool:
        for idle in self._idle.values():
            if idle:
                conn = idle.pop(0)
                self._discard(conn)
                return True
        return False

    async def _connect(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        context = None
        if origin.tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        self._open += 1
        try:
            _, conn = await loop.create_connection(
                lambda: _Connection(self, origin.key),
                origin.host,
                origin.port,
                ssl=context,
            )
        except OSError as exc:
            self._open -= 1
            self._wake_one()
            raise UpstreamError("connect failed") from exc
        except BaseException:
            self._open -= 1
            self._wake_one()
            raise
        self._all.add(conn)
        return conn

    def _release(self, conn: _Connection) -> None:
        conn.head = None
        conn.sender = None
        # A time, not a timer: a timer started and cancelled for every
        # request cost some 4,000 instructions. One timer for the pool
        # closes what stays idle (_sweep), and _take_idle what it finds
        # stale. Both rely on each list being in the order of idle_since: a
        # response read late by a slow caller ended before others released
        # earlier.
        idle = self._idle.setdefault(conn.key, [])
        if idle and idle[-1].idle_since > conn.idle_since:
            bisect.insort(idle, conn, key=_IDLE_SINCE)
        else:
            idle.append(conn)
        if self._sweeper is None:
            self._sweeper = conn.loop.call_later(self._idle_timeout, self._sweep)
        self._wake_one()

    def _sweep(self) -> None:
        """Close the connections idle for the idle timeout; again for the next."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        next_due = math.inf
        for idle in self._idle.values():
            # Each list is in the order of idle_since: the oldest first.
            expired = 0
            while (
                expired < len(idle)
                and idle[expired].idle_since + self._idle_timeout <= now
            ):
                expired += 1
            for conn in idle[:expired]:
                self._discard(conn)
            del idle[:expired]
            if idle:
                next_due = min(next_due, idle[0].idle_since + self._idle_timeout)
        if next_due < math.inf:
            # At least the loop's 1 ms tick: a shorter delay runs at once,
            # and the sweep would spin until the clock moved.
            delay = max(next_due - now, 0.001)
            self._sweeper = loop.call_later(delay, self._sweep)

    def _discard(self, conn: _Connection) -> None:
        conn.head = None
        sender = conn.sender
        if sender is not None and not sender.done():
            sender.cancel()
        conn.close()
        # Gone from the count now, not when the transport reports its loss:
        # at the limit, _acquire would otherwise close every idle
        # connection to make room for one.
        self._forget(conn)

    def _forget(self, conn: _Connection) -> None:
        if conn in self._all:
            self._all.discard(conn)
            self._open -= 1
            self._wake_one()

    def _lost(self, conn: _Connection) -> None:
        self._forget(conn)
        idle = self._idle.get(conn.key)
        if idle is not None and conn in idle:
            idle.remove(conn)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        """Close every connection, idle or busy."""
        for timer in (self._sweeper, self._alarm):
            if timer is not None:
                timer.cancel()
        self._sweeper = self._alarm = None
        self._alarm_at = _NEVER
        for conn in list(self._all):
            conn.close()
        self._idle.clear()
        # Let the transports report their loss before the loop goes.
        await asyncio.sleep(0)


async def _send_body(conn: _Connection, read: BodyReader, length: int | None) -> None:
    """Stream the request body, waiting whenever the agent's socket is full.

    A body that does not match its announced length never goes out whole:
    more bytes than announced would reach the agent as a request of their
    own, so the exchange fails and its connection is closed instead.
    """
    left = length
    while True:
        chunk = await read()
        if not chunk:
            break
        conn.body_started = True
        if left is None:
            conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            left -= len(chunk)
            if left < 0:
                raise UpstreamError("request body longer than announced")
            conn.write(chunk)
        await conn.drain()
    conn.body_started = True
    if left is None:
        conn.write(b"0\r\n\r\n")
    elif left:
        raise UpstreamError("request body shorter than announced")
    conn.body_done = True


def _sent(conn: _Connection, task: asyncio.Task[None]) -> None:
    """A body that could not be sent whole leaves its connection unusable."""
    if task.cancelled() or task.exception() is not None:
        conn.body_done = False
        conn.close()
