"""The traffic port's HTTP/1.1 server: connections, request heads, framing.

Proxying is what the gateway exists for, and a general-purpose server spent
a third of each request's CPU building request and response objects. This
one parses with llhttp (``httptools``, strict: no lenient flag is set) and
does only what a proxy's caller side needs: limits on request heads, one
request at a time per connection (pipelined ones wait their turn), the
request body handed on as it arrives, and response framing. A handler gets a
:class:`TrafficRequest` and answers through it; everything about the
connection (keep-alive, chunked coding, HTTP/1.0 callers, the drain) is
decided here.

What any caller can send is never echoed or logged: a refused head gets a
fixed JSON answer, and the connection is closed after it.
"""

from __future__ import annotations

import asyncio
import http
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from typing import cast

import httptools
import msgspec
from multidict import CIMultiDict, istr

from gateway.log import access_log, gateway_log
from gateway.upstream import NO_BODY_STATUS

__all__ = [
    "KEEPALIVE_S",
    "MAX_HEADER_COUNT",
    "SEND_TIMEOUT_S",
    "Handler",
    "RequestBody",
    "TrafficRequest",
    "TrafficServer",
    "reason_phrase",
]

Handler = Callable[["TrafficRequest"], Awaitable[None]]

#: Request header lines a head may hold by default.
MAX_HEADER_COUNT = 100

#: How long a kept-alive connection may stay silent between requests.
KEEPALIVE_S = 75.0

#: How long a caller may leave what the gateway sends it unread (its socket
#: full) before the connection is cut: a handler waiting to write holds its
#: agent's connection, and a closing connection its unsent bytes.
SEND_TIMEOUT_S = 60.0

# Request body buffered before the caller's socket is paused; it is resumed
# once the handler has taken what is buffered.
_HIGH_WATER = 256 * 1024

# After the last answer on a connection, what the caller still sends (the
# rest of a body the answer did not wait for, say) is read and dropped for up
# to this long before the connection closes: closing with unread bytes would
# reset it, and the caller could lose the answer.
_LINGER_S = 2.0

# How often idle connections are swept and the Date header is renewed.
_TICK_S = 1.0

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CHUNKED = b"Transfer-Encoding: chunked\r\n"
_CLOSE = b"Connection: close\r\n"
_KEEP_ALIVE = b"Connection: keep-alive\r\n"
_LAST_CHUNK = b"0\r\n\r\n"

# Bodies up to this size are framed by concatenation (one copy); larger ones
# are written as a vector, without copying.
_SMALL_CHUNK = 16 * 1024

_json = msgspec.json.Encoder()


_REASONS = {status.value: status.phrase.encode("latin-1") for status in http.HTTPStatus}


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase of a status."""
    return _REASONS.get(status, b"Unknown")


class _Refusal(Exception):
    """A request head the gateway answers itself, then closes the connection."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message


# The fixed answers, as _Refusal arguments: an exception raised anew each time
# (one instance raised again would keep every traceback it went through).
_MALFORMED = (400, "bad_request", "Malformed HTTP request")
_TARGET_TOO_LONG = (
    414,
    "uri_too_long",
    "The request target is longer than the gateway accepts",
)
_LINE_TOO_LONG = (
    431,
    "header_too_large",
    "A request header line is longer than the gateway accepts",
)
_CODING_NOT_IMPLEMENTED = (
    501,
    "not_implemented",
    "Only the chunked transfer coding is accepted",
)
_HEAD_TOO_LARGE = (
    431,
    "header_too_large",
    "The request headers are larger than the gateway accepts",
)
_TOO_MANY_HEADERS = (
    431,
    "header_too_large",
    "The request has more header lines than the gateway accepts",
)


class RequestBody:
    """A request body as it arrives; :meth:`read` hands on what is buffered."""

    __slots__ = ("_chunks", "_conn", "_error", "_size", "_waiter", "done")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._chunks: list[bytes] = []
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self.done = False

    @property
    def buffered(self) -> int:
        return self._size

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        self._wake()

    def end(self) -> None:
        self.done = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self._error = error
            self._wake()

    async def read(self) -> bytes:
        """What arrived since the last read; ``b""`` once the body is complete.

        Raises ConnectionResetError when the caller goes away mid-body.
        """
        while not self._chunks:
            if self.done:
                return b""
            if self._error is not None:
                raise self._error
            waiter = self._conn.loop.create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._size = 0
        self._conn.update_reading()
        return data

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class TrafficRequest:
    """One request of a caller, and the way to answer it.

    ``target`` is the raw request target, decoded as UTF-8 with surrogate
    escapes so that it encodes back to the bytes the caller sent; header
    names and values likewise. ``content_length`` is None for a chunked body.
    """

    __slots__ = (
        "_chunked",
        "_close_after",
        "_conn",
        "body",
        "content_length",
        "finished",
        "headers",
        "host",
        "keep_alive",
        "method",
        "refusal",
        "remote",
        "started",
        "status",
        "target",
        "version",
    )

    scheme = "http"

    def __init__(
        self,
        conn: _Connection,
        method: str,
        target: str,
        version: str,
        headers: CIMultiDict[str],
        keep_alive: bool,
    ) -> None:
        self._conn = conn
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.remote = conn.remote
        self.host: str | None = None
        self.content_length: int | None = None
        self.body: RequestBody | None = None
        self.refusal: _Refusal | None = None
        self.started = False
        self.finished = False
        self.status = 0
        self._chunked = False
        self._close_after = False

    # --- answering --------------------------------------------------------------

    def send_continue(self) -> None:
        """Tell an ``Expect: 100-continue`` caller to send its body now."""
        if self.version == "1.1" and not self.started:
            self._conn.write(_CONTINUE)

    def send_head(
        self,
        status: int,
        reason: bytes,
        lines: bytes,
        *,
        length_known: bool,
        has_date: bool,
        data: bytes = b"",
        last: bool = False,
    ) -> None:
        """Write the status line and ``lines`` (header lines, each with CRLF).

        The framing of the body is added here: ``length_known`` says the
        lines hold a Content-Length; otherwise an HTTP/1.1 caller gets the
        body chunked and an HTTP/1.0 caller gets it up to the close. ``data``
        is the start of the body, ``last`` that it is the whole body.
        """
        if self.started:
            return  # answered already (a refusal came first)
        conn = self._conn
        version = b"HTTP/1.0 " if self.version == "1.0" else b"HTTP/1.1 "
        parts = [version, b"%d %b\r\n" % (status, reason), lines]
        if not has_date:
            parts.append(conn.server.date_line)

        bodiless = self.method == "HEAD" or status in NO_BODY_STATUS
        # An answer begun before the request body has all arrived closes the
        # connection after it (see _linger), and says so: a caller that took
        # the connection for reusable would lose its next request.
        body = self.body
        close = (
            not self.keep_alive or conn.closing or (body is not None and not body.done)
        )
        if not (bodiless or length_known):
            if self.version == "1.1":
                self._chunked = True
                parts.append(_CHUNKED)
            else:
                close = True
        if close:
            parts.append(_CLOSE)
        elif self.version == "1.0":
            parts.append(_KEEP_ALIVE)
        parts.append(b"\r\n")

        self.started = True
        self.status = status
        self._close_after = close
        if bodiless:
            # Complete with its head: no byte of a body may follow it.
            data = b""
            self._chunked = False
            last = True
        if data:
            parts.append(self._framed(data) if self._chunked else data)
        if last:
            if self._chunked:
                parts.append(_LAST_CHUNK)
            self.finished = True
        conn.write(b"".join(parts))

    async def send_body(self, data: bytes) -> None:
        """Write a piece of the body; waits while the caller is slow to read."""
        if self.finished:
            return
        conn = self._conn
        if self._chunked:
            if len(data) > _SMALL_CHUNK:
                conn.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
            else:
                conn.write(self._framed(data))
        else:
            conn.write(data)
        if conn.write_paused:
            await conn.drained()

    def end(self, data: bytes = b"") -> None:
        """Write the rest of the body, if any, and its end."""
        if self.finished:
            return
        conn = self._conn
        if self._chunked:
            conn.write(self._framed(data) + _LAST_CHUNK if data else _LAST_CHUNK)
        elif data:
            conn.write(data)
        self.finished = True

    def send_error(
        self,
        status: int,
        error: str,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        """The gateway's own answer: ``{"error", "message"}`` as JSON."""
        body = _json.encode({"error": error, "message": message})
        lines = b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
        if headers:
            extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            lines += extra.encode("latin-1")
        self.send_head(
            status,
            reason_phrase(status),
            lines,
            length_known=True,
            has_date=False,
            data=body,
            last=True,
        )

    def abort(self) -> None:
        """Cut the caller's connection: a truncated body must not pass as whole."""
        self._conn.abort()

    @staticmethod
    def _framed(data: bytes) -> bytes:
        return b"%x\r\n%b\r\n" % (len(data), data)


class _Connection(asyncio.Protocol):
    """One caller's connection: parses requests, runs them one at a time."""

    # Slots: every request reads and writes these. With an instance dict, one
    # attribute past the 30 a dict's keys can share made each access slower.
    __slots__ = (
        "_body_of",
        "_count_limit",
        "_drain",
        "_head_bytes",
        "_head_limit",
        "_head_size",
        "_head_timer",
        "_headers",
        "_in_head",
        "_in_trailers",
        "_last_parsed",
        "_line_limit",
        "_lines",
        "_linger_timer",
        "_lost",
        "_parser",
        "_queue",
        "_reading_paused",
        "_receiving",
        "_stall_timer",
        "_stopped",
        "_url",
        "closing",
        "idle_since",
        "loop",
        "remote",
        "server",
        "task",
        "transport",
        "write_paused",
    )

    def __init__(self, server: TrafficServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.remote = ""
        self._parser = httptools.HttpRequestParser(self)
        self._line_limit = server.line_limit
        self._head_limit = server.head_limit
        self._count_limit = server.count_limit

        # The head being parsed.
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._in_head = False
        # After a chunk's size line, until its data: for the last chunk, the
        # trailer section, whose lines llhttp buffers as it does a head's.
        self._in_trailers = False
        self._head_bytes = 0  # bytes of reads wholly within the current head
        self._head_size = 0  # the header lines of this head so far
        self._lines = 0  # and how many there are
        self._head_timer: asyncio.TimerHandle | None = None

        # Parsed requests not yet answered; the first one is being served.
        self._queue: deque[TrafficRequest] = deque()
        self._receiving: TrafficRequest | None = None
        self.task: asyncio.Task[None] | None = None

        self.closing = False  # no request is served after the current one
        self._stopped = False  # nothing more is parsed
        self._last_parsed = False  # the last request this connection will take
        self._body_of: TrafficRequest | None = None
        self._lost = False
        self._reading_paused = False
        self.write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        self.idle_since = self.loop.time()
        self._linger_timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.remote = str(peer[0])
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return
        if self._in_head or self._in_trailers:
            # Reads that fall wholly within one head (or trailer section) are
            # counted too: a line without end grows in the parser's buffer,
            # unseen by on_header. Counted before the parse, as the start of
            # a head or of a chunk zeroes it.
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgrade_requested(data[upgrade.args[0] :])
        except httptools.HttpParserError as exc:
            self._refuse(_refusal_of(exc))
            return
        if self.task is None and self._queue:
            self._serve_next()
        if (self._in_head or self._in_trailers) and (
            self._head_bytes > self._head_limit
        ):
            self._refuse(_Refusal(*_HEAD_TOO_LARGE))
            return
        if self._in_head and self._head_timer is None:
            # A head has begun and is not complete: it must be within the bound.
            self._head_timer = self.loop.call_later(
                self.server.header_timeout_s, self._head_timed_out
            )
        self.update_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.server.forget(self)
        self._cancel_timers()
        self._cancel_stall_timer()
        gone = ConnectionResetError("the caller closed the connection")
        for request in self._queue:
            if request.body is not None:
                request.body.fail(gone)
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(gone)
        if self.task is not None:
            # A caller that goes away cancels its request, and so the upstream
            # call.
            self.task.cancel()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self._stall_timer is None:
            self._stall_timer = self.loop.call_later(
                self.server.send_timeout_s, self.abort
            )

    def resume_writing(self) -> None:
        self.write_paused = False
        self._cancel_stall_timer()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # --- llhttp callbacks -------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._head_size = 0
        self._lines = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._line_limit:
            raise _Refusal(*_TARGET_TOO_LONG)

    def on_header(self, name: bytes, value: bytes) -> None:
        # A head, or the trailer section of a chunked body: bounded alike.
        size = len(name) + len(value) + 2
        if size > self._line_limit:
            raise _Refusal(*_LINE_TOO_LONG)
        # Counted here too, exactly: a read may end one head and begin the next.
        self._head_size += size
        if self._head_size > self._head_limit:
            raise _Refusal(*_HEAD_TOO_LARGE)
        self._lines += 1
        if self._lines > self._count_limit:
            # Each line costs work however short it is: 140 KB of "a: b"
            # lines took the CPU of some 150 ordinary requests.
            raise _Refusal(*_TOO_MANY_HEADERS)
        if not self._in_head:
            return  # trailers are not passed on
        # Optional whitespace around a value is not part of it (RFC 9110 5.5);
        # llhttp has skipped what precedes it.
        value = value.rstrip(b" \t")
        # Decoded as _text does, by the cheapest call that gives the same
        # str: this runs for every line. A name is a token (llhttp refuses
        # any other byte), so ASCII; a value is nearly always UTF-8.
        try:
            text = value.decode()
        except UnicodeDecodeError:
            text = value.decode("utf-8", "surrogateescape")
        self._headers.append((name.decode(), text))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        body_of = self._body_of
        if body_of is not None:
            # The stand-in head of an upgrade request's body (_read_body_of).
            self._body_of = None
            self._receiving = body_of
            return
        if self.closing or self._last_parsed:
            self._stopped = True  # a request after the last one served: ignored
            return

        parser = self._parser
        request = TrafficRequest(
            self,
            parser.get_method().decode("latin-1"),
            _text(self._url),
            parser.get_http_version(),
            CIMultiDict(self._headers),
            parser.should_keep_alive(),
        )
        _frame_body(request, self)
        if request.refusal is not None:
            self._stopped = True  # answered, then closed: nothing after it
        self._receiving = request
        self._queue.append(request)

    def on_body(self, body: bytes) -> None:
        self._in_trailers = False
        request = self._receiving
        if request is not None and request.body is not None:
            request.body.feed(body)

    def on_chunk_header(self) -> None:
        self._in_trailers = True
        self._head_bytes = 0
        self._head_size = 0
        self._lines = 0

    def on_message_complete(self) -> None:
        self._in_trailers = False
        request = self._receiving
        self._receiving = None
        if request is None:
            return
        if request.body is not None:
            request.body.end()

    # --- refusals ---------------------------------------------------------------

    def _refuse(self, refusal: _Refusal) -> None:
        """Answer after the requests before it, then close; parse no more."""
        self._stopped = True
        self._in_head = False
        self._cancel_head_timer()
        receiving = self._receiving
        self._receiving = None
        if receiving is not None and receiving.body is not None:
            # The framing of a body is broken (a bad chunk, or a coding that
            # llhttp refuses once the head is in): that request is refused.
            self._refuse_request(receiving, refusal)
        else:
            request = TrafficRequest(self, "GET", "", "1.1", CIMultiDict(), False)
            request.refusal = refusal
            self._queue.append(request)
        if self.task is None and self._queue:
            self._serve_next()
        self.update_reading()

    def _refuse_request(self, request: TrafficRequest, refusal: _Refusal) -> None:
        request.body = None
        request.keep_alive = False
        if request is not self._queue[0] or self.task is None:
            request.refusal = refusal  # answered when its turn comes
            return
        # Being served: answered now if nothing of the answer left yet, and
        # the handler (and so its upstream call) is cancelled.
        if not request.started:
            request.send_error(refusal.status, refusal.error, refusal.message)
        else:
            self.abort()
        self.task.cancel()

    def _upgrade_requested(self, rest: bytes) -> None:
        # The gateway does not switch protocols: the request is answered as
        # any other, and the connection closes after it, so that nothing sent
        # after it (in what the caller took for another protocol) is ever
        # parsed as HTTP.
        self._stopped = True
        request = self._queue[-1] if self._queue else None
        if request is None:
            return
        request.keep_alive = False
        self._receiving = None
        if request.body is not None and request.refusal is None:
            self._read_body_of(request, rest)
        self.update_reading()

    def _read_body_of(self, request: TrafficRequest, rest: bytes) -> None:
        """Parse the body of an upgrade request, which llhttp skips.

        A parser of its own is given a head with the same framing and no
        Upgrade, then the bytes after the real head: it reads the body as
        it would any other, and nothing after it.
        """
        if request.content_length is None:
            framing = b"Transfer-Encoding: chunked"
        else:
            framing = b"Content-Length: %d" % request.content_length
        request.body = RequestBody(self)
        self._body_of = request
        self._last_parsed = True
        self._stopped = False
        self._parser = httptools.HttpRequestParser(self)
        try:
            self._parser.feed_data(b"POST / HTTP/1.1\r\n%b\r\n\r\n" % framing)
            self._parser.feed_data(rest)
        except httptools.HttpParserError as exc:
            self._refuse(_refusal_of(exc))

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._reading_paused or self.task is not None:
            # Our own pause held the head back, not the caller; or the head
            # is a pipelined one, whose caller is waiting for an answer.
            self._head_timer = self.loop.call_later(
                self.server.header_timeout_s, self._head_timed_out
            )
            return
        self._close()

    # --- serving ----------------------------------------------------------------

    def _serve_next(self) -> None:
        request = self._queue[0]
        self.task = self.loop.create_task(self._serve(request))

    async def _serve(self, request: TrafficRequest) -> None:
        try:
            if self.write_paused:
                # The caller has not read the answers before this one: more
                # would pile up in the transport's buffer without bound.
                await self.drained()
            if request.refusal is not None:
                refusal = request.refusal
                request.keep_alive = False
                request.send_error(refusal.status, refusal.error, refusal.message)
            else:
                await self.server.handler(request)
        except ConnectionError:
            self.abort()  # the caller went away, or broke its own request
        except Exception:
            gateway_log.exception("unexpected error serving a request")
            if not request.started:
                request.keep_alive = False
                request.send_error(
                    500, "internal_error", "The gateway could not answer this request"
                )
        finally:
            self._served(request)

    def _served(self, request: TrafficRequest) -> None:
        self.task = None
        self._queue.popleft()
        if self._lost:
            return
        if not request.finished:
            # Cut mid-answer (or never answered): the caller must not take a
            # partial body for a complete one.
            self.abort()
            return
        self.server.log_access(request)

        body = request.body
        if request._close_after or self.closing or (body is not None and not body.done):
            self._linger()
            return
        self.idle_since = self.loop.time()
        if self._queue:
            self._serve_next()
        self.update_reading()

    def _linger(self) -> None:
        """Close after the answer, without losing it.

        Closing a socket with unread bytes resets it, and the reset can
        overtake the answer. So the sending side is shut, what the caller
        still sends is read and dropped, and the connection closes when the
        caller closes its side, or after a moment.
        """
        self.closing = True
        self._stopped = True
        self._cancel_timers()
        transport = self.transport
        if transport is None or self._lost:
            return
        if transport.can_write_eof():
            transport.write_eof()
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        self._linger_timer = self.loop.call_later(_LINGER_S, self._close)

    # --- transport --------------------------------------------------------------

    def update_reading(self) -> None:
        """Pause the caller's socket while requests or body bytes pile up."""
        transport = self.transport
        if transport is None or self._lost:
            return
        receiving = self._receiving
        if self._stopped and self.closing:
            return  # lingering: reading goes on, to drop what comes
        pause = len(self._queue) > 1 or (
            receiving is not None
            and receiving.body is not None
            and receiving.body.buffered > _HIGH_WATER
        )
        if pause and not self._reading_paused:
            self._reading_paused = True
            transport.pause_reading()
        elif not pause and self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()

    def write(self, data: bytes) -> None:
        if not self._lost and self.transport is not None:
            self.transport.write(data)

    def writelines(self, data: tuple[bytes, ...]) -> None:
        if not self._lost and self.transport is not None:
            self.transport.writelines(data)

    async def drained(self) -> None:
        if self._lost:
            raise ConnectionResetError("the caller closed the connection")
        if self.write_paused:
            self._drain = self.loop.create_future()
            await self._drain

    @property
    def idle(self) -> bool:
        return self.task is None and not self._in_head and not self._queue

    def close_if_idle_since(self, before: float) -> None:
        if self.idle and self.idle_since < before:
            self._close()

    def _close(self) -> None:
        self._cancel_timers()
        transport = self.transport
        if transport is not None and not self._lost:
            transport.close()
            if transport.get_write_buffer_size() and self._stall_timer is None:
                # The transport closes once its buffer is out, which a caller
                # that reads nothing more would put off for ever.
                self._stall_timer = self.loop.call_later(
                    self.server.send_timeout_s, self.abort
                )

    def abort(self) -> None:
        self._cancel_timers()
        if self.transport is not None and not self._lost:
            self.transport.abort()

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._linger_timer = None

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _cancel_stall_timer(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None


def _refusal_of(error: httptools.HttpParserError) -> _Refusal:
    """The answer to a parse error: ours when a callback raised it, else 400."""
    refusal = error.__context__
    return refusal if isinstance(refusal, _Refusal) else _Refusal(*_MALFORMED)


def _text(raw: bytes) -> str:
    # Surrogate escapes keep bytes that are not UTF-8: they encode back as sent.
    return raw.decode("utf-8", "surrogateescape")


# Header names as istr: a lookup skips lower-casing the name each request.
_HOST = istr("Host")
_TRANSFER_ENCODING = istr("Transfer-Encoding")
_CONTENT_LENGTH = istr("Content-Length")


def _frame_body(request: TrafficRequest, conn: _Connection) -> None:
    """Host, and the body the head announces (llhttp checked its framing)."""
    headers = request.headers
    hosts = headers.getall(_HOST, ())
    if len(hosts) > 1 or (not hosts and request.version == "1.1"):
        # RFC 9112 section 3.2: exactly one Host in an HTTP/1.1 request.
        request.refusal = _Refusal(*_MALFORMED)
        request.keep_alive = False
        return
    if hosts:
        request.host = hosts[0]

    codings = headers.getall(_TRANSFER_ENCODING, ())
    if codings:
        # HTTP/1.0 has no chunked coding: RFC 9112 section 6.1 calls such a
        # framing faulty, as a server in front may well have read it
        # otherwise. And Transfer-Encoding is hop-by-hop: a coding the gateway
        # does not decode would reach the agent unannounced, as if it were
        # none; section 6.1 answers it with 501.
        refusal = None
        if request.version != "1.1":
            refusal = _MALFORMED
        elif not _chunked_alone(codings):
            refusal = _CODING_NOT_IMPLEMENTED
        if refusal is not None:
            request.refusal = _Refusal(*refusal)
            request.keep_alive = False
            return
        request.body = RequestBody(conn)
        return
    length = headers.get(_CONTENT_LENGTH)
    if length is not None:
        request.content_length = int(length)
        if request.content_length > 0:
            request.body = RequestBody(conn)


def _chunked_alone(codings: list[str]) -> bool:
    """Whether Transfer-Encoding lists chunked and nothing else."""
    listed = [c.strip() for value in codings for c in value.split(",")]
    return [c.lower() for c in listed if c] == ["chunked"]


class TrafficServer:
    """The traffic port of one worker.

    ``max_header_size`` bounds each header line, counted as name, ": " and
    value (431 beyond), and the request target (414 beyond); a head as a
    whole may hold four such lines and 64 KiB more, in at most
    ``max_header_count`` header lines (431 beyond), and so may the trailer
    section of a chunked body. A head must be complete
    within ``header_timeout_s`` seconds of its first byte, or the connection
    is closed.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        max_header_size: int,
        header_timeout_s: float,
        max_header_count: int = MAX_HEADER_COUNT,
        access_log_enabled: bool = False,
        keepalive_s: float = KEEPALIVE_S,
        send_timeout_s: float = SEND_TIMEOUT_S,
    ) -> None:
        self.handler = handler
        self.line_limit = max_header_size
        self.head_limit = 4 * max_header_size + 64 * 1024
        self.count_limit = max_header_count
        self.header_timeout_s = header_timeout_s
        self.keepalive_s = keepalive_s
        self.send_timeout_s = send_timeout_s
        self.access_log = access_log_enabled
        self.loop = asyncio.get_running_loop()
        self.connections: set[_Connection] = set()
        self.date_line = b""
        self._listeners: list[asyncio.Server] = []
        self._emptied: asyncio.Future[None] | None = None  # while draining
        self._ticker: asyncio.TimerHandle | None = None
        self._tick()

    def _tick(self) -> None:
        self.date_line = b"Date: %b\r\n" % formatdate(usegmt=True).encode()
        before = self.loop.time() - self.keepalive_s
        for conn in list(self.connections):
            conn.close_if_idle_since(before)
        self._ticker = self.loop.call_later(_TICK_S, self._tick)

    def _connection(self) -> _Connection:
        return _Connection(self)

    async def listen(self, host: str, port: int) -> None:
        listener = await self.loop.create_server(
            self._connection, host, port, reuse_port=True, backlog=1024
        )
        self._listeners.append(listener)

    def forget(self, conn: _Connection) -> None:
        self.connections.discard(conn)
        emptied = self._emptied
        if not self.connections and emptied is not None and not emptied.done():
            emptied.set_result(None)

    def log_access(self, request: TrafficRequest) -> None:
        if self.access_log:
            path = request.target.partition("?")[0]  # a query may carry secrets
            access_log.info(
                '%s "%s %s HTTP/%s" %d',
                request.remote,
                request.method,
                path,
                request.version,
                request.status,
            )

    async def drain(self, grace_s: float, close_s: float) -> int:
        """Stop accepting, let requests in progress finish within the grace.

        Idle connections are closed at once, so that their callers go
        elsewhere instead of waiting out the grace. Requests still running
        after it are cancelled, which closes their upstream and their
        caller's connection. A finished answer may still be on its way to a
        slow caller: connections are waited for within the grace too.
        Returns how many were cut.
        """
        deadline = self.loop.time() + grace_s
        self._emptied = self.loop.create_future()
        for listener in self._listeners:
            listener.close()
        busy = []
        for conn in list(self.connections):
            # One closing without a request is lingering: it closes itself.
            lingering = conn.closing and conn.task is None
            conn.closing = True
            if conn.task is not None:
                busy.append(conn.task)
            elif not lingering:
                conn._close()

        late: set[asyncio.Task[None]] = set()
        if busy:
            _, late = await asyncio.wait(busy, timeout=grace_s)
        if late:
            gateway_log.warning("drain grace over: cutting %d request(s)", len(late))
            for task in late:
                task.cancel()
            await asyncio.wait(late, timeout=close_s)
        left = deadline - self.loop.time()
        if self.connections and left > 0:
            await asyncio.wait([self._emptied], timeout=left)
        return len(late)

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        for conn in list(self.connections):
            conn.abort()
        for listener in self._listeners:
            listener.close()
            await listener.wait_closed()
