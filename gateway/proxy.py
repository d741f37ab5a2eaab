"""The traffic port: route, authenticate and stream-proxy each request.

This module is the hot path. Everything that can be decided once is decided
when a policy is applied (see :mod:`gateway.policies`); a request costs a
path normalization, one dict lookup, the authenticator, a header copy and
the streaming itself. Nothing here logs per request.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, cast

import msgspec
from aiohttp import web
from aiohttp.http import HttpVersion10, HttpVersion11, RawRequestMessage
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.http_writer import StreamWriter
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from multidict import CIMultiDict

from gateway.auth import AuthFailure, Identity
from gateway.headers import HOP_BY_HOP
from gateway.metrics import UNROUTED
from gateway.policies import PolicyTable, Route
from gateway.routing import InvalidTarget, Target, split_target, upstream_path
from gateway.upstream import (
    NO_BODY_STATUS,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
)

__all__ = [
    "Proxy",
    "TrafficServer",
    "error_response",
    "request_head",
]

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_VERSIONS = (HttpVersion10, HttpVersion11)

_json = msgspec.json.Encoder()

# Control characters, which llhttp lets through in a reason phrase only.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def error_response(
    status: int,
    error: str,
    message: str,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """The gateway's one error shape: ``{"error", "message"}``."""
    body = _json.encode({"error": error, "message": message})
    return _ErrorResponse(
        status=status, body=body, content_type="application/json", headers=headers
    )


class _ErrorResponse(web.Response):
    """An answer of the gateway's own, which does not name its server software."""

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        self.headers.popall("Server", None)


def _listed(values: Iterable[str]) -> frozenset[str]:
    """Header names listed in Connection values, which are hop-by-hop too."""
    return frozenset(
        token.strip().lower() for value in values for token in value.split(",")
    )


def _response_headers(headers: list[tuple[bytes, bytes]]) -> CIMultiDict[str]:
    """The agent's response headers as the caller receives them.

    Values are latin-1 text, one character per byte, so that they encode
    back to the very bytes the agent sent (see _RelayResponse).
    """
    listed = [v.decode("latin-1") for n, v in headers if n.lower() == b"connection"]
    drop = HOP_BY_HOP | _listed(listed) if listed else HOP_BY_HOP
    copied: CIMultiDict[str] = CIMultiDict()
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1")
        if name.lower() not in drop:
            copied.add(name, raw_value.decode("latin-1"))
    return copied


class _RelayResponse(web.StreamResponse):
    """An agent's response for the caller: the agent's head, byte for byte.

    Two things of aiohttp's StreamResponse would change it. Its serializer
    encodes header values as UTF-8 and drops what is not, so an agent's
    ``caf\\xe9`` would reach the caller as ``caf``: this head is encoded as
    latin-1 instead, which gives back the bytes the agent sent. And it adds
    Content-Type and Server when absent: both are removed again unless the
    agent sent them. What stays of aiohttp's own is the caller's framing
    (Transfer-Encoding, Connection) and a Date when the agent sent none,
    which RFC 9110 section 6.6.1 asks of a recipient forwarding a response.
    """

    def __init__(
        self, request: web.BaseRequest, upstream: UpstreamResponse, *, coalesce: bool
    ) -> None:
        headers = _response_headers(upstream.headers)
        reason = upstream.reason
        # A reason phrase with control characters would break the head; the
        # standard phrase of the status replaces it.
        clean = reason and _CONTROL.search(reason) is None
        super().__init__(
            status=upstream.status,
            reason=reason.decode("latin-1") if clean else None,
            headers=headers,
        )
        self._caller = request
        self._coalesce = coalesce
        if (
            request.version < HttpVersion11
            and "Content-Length" not in headers
            and _may_have_body(request.method, upstream.status)
        ):
            # An HTTP/1.0 caller knows where such a body ends by the close
            # alone: the connection cannot be kept alive after it.
            self.force_close()
        self._own_content_type = "Content-Type" in headers
        self._own_server = "Server" in headers

    async def _write_headers(self) -> None:
        headers = self.headers
        if not self._own_content_type:
            headers.popall("Content-Type", None)
        if not self._own_server:
            headers.popall("Server", None)

        version = self._caller.version
        status = f"HTTP/{version.major}.{version.minor} {self.status} {self.reason}\r\n"
        lines = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
        head = (status + lines + "\r\n").encode("latin-1")

        # Handed to aiohttp's writer as its write_headers() would, so that
        # its framing of the body stays its own and, when coalescing, the
        # head leaves with the first body bytes in one write.
        writer = cast(StreamWriter, self._payload_writer)
        writer._headers_buf = head
        writer._headers_written = False
        if not self._coalesce:
            writer.send_headers()


def _may_have_body(method: str, status: int) -> bool:
    # Interim (1xx) answers never reach here: the upstream client skips them.
    return method != "HEAD" and status not in NO_BODY_STATUS


def request_head(
    request: web.BaseRequest, route: Route, target: Target, identity: Identity
) -> bytes:
    """The request head as the upstream receives it, framing headers included.

    The identity must be forwardable (``identity.lines`` is not None).
    """
    path = upstream_path(route.base_path, target.rest)
    if target.query:
        path = path + "?" + target.query
    lines = [f"{request.method} {path} HTTP/1.1\r\nHost: {route.host_header}\r\n"]

    headers = request.headers
    drop = route.drop
    if "Connection" in headers:
        drop = drop | _listed(headers.getall("Connection"))
    for name, value in headers.items():
        lower = name.lower()
        # Some agent servers read "_" as "-": X_Auth_Subject must not pass
        # for the gateway's own X-Auth-Subject.
        if lower in drop or ("_" in lower and lower.replace("_", "-") in drop):
            continue
        lines.append(f"{name}: {value}\r\n")
    assert identity.lines is not None
    lines.append(identity.lines)

    peer = request.remote or ""
    prior = headers.getall("X-Forwarded-For", ())
    forwarded_for = ", ".join((*prior, peer)) if prior else peer
    lines.append(
        f"X-Forwarded-For: {forwarded_for}\r\n"
        f"X-Forwarded-Proto: {request.scheme}\r\n"
        f"X-Forwarded-Host: {request.host}\r\n"
    )
    lines.append(_framing(request))
    return "".join(lines).encode("utf-8", "surrogateescape")


def _framing(request: web.BaseRequest) -> str:
    """The body framing sent upstream: always ours, never the caller's as-is."""
    if request.body_exists:
        length = request.content_length
        if length is None:
            return "Transfer-Encoding: chunked\r\n\r\n"
        return f"Content-Length: {length}\r\n\r\n"
    if "Content-Length" in request.headers:
        return "Content-Length: 0\r\n\r\n"
    return "\r\n"


def _expects_continue(request: web.BaseRequest) -> bool:
    expect = request.headers.get("Expect")
    return expect is not None and expect.lower() == "100-continue"


class Proxy:
    """Forwards requests to their agents over one connection pool per worker."""

    _loop: asyncio.AbstractEventLoop  # set by start()

    def __init__(self, table: PolicyTable, *, connection_limit: int = 0) -> None:
        self._table = table
        self._pool = UpstreamPool(connection_limit=connection_limit)

    async def start(self) -> None:
        """Take the loop; connections are opened as requests need them."""
        # Held, not asked for per request: that costs a getpid() system call.
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        await self._pool.close()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """The traffic port's only handler."""
        if request.version not in _VERSIONS:
            UNROUTED.answered(505)
            return error_response(
                505, "http_version_not_supported", "Only HTTP/1.0 and 1.1 are served"
            )
        try:
            target = split_target(request.raw_path)
        except InvalidTarget as exc:
            UNROUTED.answered(400)
            return error_response(400, "bad_request", str(exc))

        route = None
        if target is not None:
            route = self._table.routes.get((target.project, target.agent))
        if route is None or target is None:
            UNROUTED.answered(404)
            return error_response(404, "not_found", "No agent is deployed here")

        try:
            identity = route.authenticator.check(request.headers)
            if not isinstance(identity, Identity):
                identity = await identity
        except AuthFailure as failure:
            route.metrics.answered(failure.status)
            return error_response(
                failure.status, failure.error, failure.message, failure.headers
            )

        return await self._forward(request, route, target, identity)

    async def _forward(
        self,
        request: web.BaseRequest,
        route: Route,
        target: Target,
        identity: Identity,
    ) -> web.StreamResponse:
        if identity.lines is None:
            route.metrics.answered(502)
            return error_response(
                502, "bad_gateway", "The identity cannot be forwarded to the agent"
            )
        head = request_head(request, route, target, identity)
        if _expects_continue(request):
            await request.writer.write(_CONTINUE)

        body = None
        if request.body_exists:
            body = request.content.readany
        loop = self._loop
        started = loop.time()
        try:
            upstream = await self._pool.request(
                route.origin,
                head,
                body,
                length=request.content_length,
                head_only=request.method == "HEAD",
                timeout_s=route.timeout_s,
            )
        except UpstreamTimeout:
            route.metrics.answered(504)
            return error_response(
                504, "gateway_timeout", "The agent did not answer in time"
            )
        except UpstreamError:
            route.metrics.answered(502)
            return error_response(502, "bad_gateway", "The agent could not be reached")

        route.metrics.latency.observe(loop.time() - started)
        route.metrics.answered(upstream.status)
        return await self._relay(request, upstream, route.timeout_s)

    async def _relay(
        self, request: web.BaseRequest, upstream: UpstreamResponse, silence_s: float
    ) -> web.StreamResponse:
        """Stream the upstream response to the caller as it arrives."""
        # When body bytes came with the head, the head waits for them and
        # both leave in one write; otherwise the caller sees the head now.
        response = _RelayResponse(request, upstream, coalesce=upstream.readable)
        try:
            await response.prepare(request)
            data = await upstream.read(silence_s)
            while data and not upstream.ended:
                await response.write(data)
                data = await upstream.read(silence_s)
            if data:
                # The whole rest is here: it leaves with the end of the body,
                # in one write.
                await upstream.read(silence_s)
            await response.write_eof(data)
        except (UpstreamError, ConnectionError):
            # Mid-stream, the status is already sent: the only honest signal
            # left is to cut the caller's connection, so a truncated body is
            # never mistaken for a complete one.
            upstream.close()
            _abort(request)
            return response
        except BaseException:
            upstream.close()
            raise
        return response


def _abort(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


class _TrafficRequestHandler(RequestHandler):
    """The traffic port's connections: limits on request heads, and answers to
    malformed requests in the gateway's JSON shape, never echoing them.

    aiohttp's own answer quotes the start of an oversized header line, and it
    logs each one; a gateway must do neither for what any caller can send.
    """

    __slots__ = (
        "_head_bytes",
        "_head_timeout_s",
        "_head_timer",
        "_last_payload",
        "_line_limit",
    )

    def __init__(
        self,
        manager: web.Server,
        *,
        max_header_size: int,
        header_timeout_s: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._line_limit = max_header_size
        self._head_timeout_s = header_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None
        # Bytes received since the read that completed the last head.
        self._head_bytes = 0
        # The body of the last request: until it is complete, what arrives
        # is body, not the start of the next head.
        self._last_payload: StreamReader | None = None

    def data_received(self, data: bytes) -> None:
        payload = self._last_payload
        expecting_head = payload is None or payload.is_eof()
        queued = len(self._messages)
        super().data_received(data)

        self._head_bytes += len(data)
        if len(self._messages) > queued:
            self._heads_parsed(queued, len(data))
        elif expecting_head and data and self._head_timer is None:
            # A head has begun: it must be complete within the bound
            # (aiohttp's keep-alive timer only closes connections that
            # sent nothing).
            self._head_timer = self._loop.call_later(
                self._head_timeout_s, self._head_timed_out
            )

    def _heads_parsed(self, queued: int, last_read: int) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        # Only a head that came with more bytes than a line may hold can
        # have a line too long; the rest of the last read may begin the
        # next head.
        if self._head_bytes > self._line_limit:
            self._refuse_long_lines(queued)
        self._head_bytes = last_read
        self._last_payload = self._messages[-1][1]

    def _refuse_long_lines(self, queued: int) -> None:
        """Turn the first parsed head with a header line too long into a 431."""
        limit = self._line_limit - len(": ")
        messages = self._messages
        for index in range(queued, len(messages)):
            message = messages[index][0]
            if not isinstance(message, RawRequestMessage):
                return
            if any(len(n) + len(v) > limit for n, v in message.raw_headers):
                while len(messages) > index:
                    messages.pop()
                # Reported as aiohttp reports the header lines it refuses.
                error = LineTooLong(b"", self.max_field_size)
                messages.append((_ErrInfo(431, error, str(error)), EMPTY_PAYLOAD))
                return

    def _head_timed_out(self) -> None:
        self._head_timer = None
        self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._last_payload = None
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, LineTooLong):
            response = _too_long(exc, self.max_line_size)
        elif isinstance(exc, BadHttpMessage):
            response = error_response(400, "bad_request", "Malformed HTTP request")
        else:
            return super().handle_error(request, status, exc, message)

        response.force_close()
        return response


def _too_long(exc: LineTooLong, target_limit: int) -> web.Response:
    # aiohttp raises the same error for the request target and for a header
    # line; only the limit it names (its second argument) tells them apart,
    # which is why the two limits always differ (see TrafficServer).
    if exc.args[1] == target_limit:
        return error_response(
            414, "uri_too_long", "The request target is longer than the gateway accepts"
        )
    return error_response(
        431,
        "header_too_large",
        "A request header line is longer than the gateway accepts",
    )


class TrafficServer(web.Server):
    """aiohttp's low-level server with the gateway's limits on request heads.

    ``max_header_size`` bounds each header line, counted as name, ": " and
    value (431 beyond), and the request target (414 beyond). A head must be
    complete within ``header_timeout_s`` seconds of its first byte, or the
    connection is closed.
    """

    def __init__(
        self,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        *,
        max_header_size: int,
        header_timeout_s: float,
        **kwargs: Any,
    ) -> None:
        # aiohttp's C parser (3.14) checks a header's name and its value
        # apart, and counts the name of the header before into the next
        # name: its own field limit, twice ours, only bounds memory, and the
        # handler checks each line exactly. Its max_line_size limits the
        # request target alone.
        super().__init__(
            handler,
            max_line_size=max_header_size,
            max_field_size=2 * max_header_size,
            max_header_size=max_header_size,
            header_timeout_s=header_timeout_s,
            **kwargs,
        )

    def __call__(self) -> RequestHandler:
        # web.Server builds its protocol from these two attributes; building
        # ours from the same keeps every handler argument (limits, timeouts).
        kwargs: dict[str, Any] = self._kwargs
        return _TrafficRequestHandler(self, loop=self._loop, **kwargs)
