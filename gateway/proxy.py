"""The traffic port's handler: route, authenticate and stream-proxy each request.

This module is the hot path. Everything that can be decided once is decided
when a policy is applied (see :mod:`gateway.policies`); a request costs a
path normalization, one dict lookup, the authenticator, a header copy and
the streaming itself. Nothing here logs per request.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Iterable

from multidict import istr

from gateway.auth import AuthFailure, Identity
from gateway.headers import HOP_BY_HOP
from gateway.metrics import UNROUTED
from gateway.policies import PolicyTable, Route
from gateway.routing import InvalidTarget, Target, split_target, upstream_path
from gateway.traffic import TrafficRequest, reason_phrase
from gateway.upstream import (
    IDLE_TIMEOUT_S,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
)

__all__ = ["Proxy", "relay_head", "request_head"]

_VERSIONS = ("1.0", "1.1")

# Control characters, which llhttp lets through in a reason phrase only.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# Phrases known clean without a search: what nearly every agent sends.
_STANDARD_REASONS = frozenset({b"OK", b"Created", b"Accepted", b"No Content"})

_HOP_BY_HOP = frozenset(name.encode() for name in HOP_BY_HOP)

# Header names as istr: a lookup skips lower-casing the name each request.
_CONNECTION = istr("Connection")
_FORWARDED_FOR = istr("X-Forwarded-For")
_EXPECT = istr("Expect")


def _listed(values: Iterable[str]) -> frozenset[str]:
    """Header names listed in Connection values, which are hop-by-hop too."""
    return frozenset(
        token.strip().lower() for value in values for token in value.split(",")
    )


def relay_head(upstream: UpstreamResponse) -> tuple[bytes, bytes, bool, bool]:
    """The agent's response head as the caller receives it, byte for byte.

    Returns the reason phrase, the header lines (hop-by-hop ones and those the
    agent's Connection names removed), and whether they hold a Content-Length
    and a Date. Values are never decoded: an agent's ``caf\\xe9`` reaches the
    caller as it was sent.
    """
    headers = upstream.headers
    lines, length_known, has_date, connection = _relayed(headers, _HOP_BY_HOP)
    if connection:
        # Most agents say keep-alive or close; others name more to remove.
        extra = _named_by_connection(b",".join(connection))
        if extra:
            lines, length_known, has_date, _ = _relayed(headers, _HOP_BY_HOP | extra)

    reason = upstream.reason
    # A reason phrase with control characters would break the head; the
    # standard phrase of the status replaces it.
    if reason not in _STANDARD_REASONS and (
        not reason or _CONTROL.search(reason) is not None
    ):
        reason = reason_phrase(upstream.status)
    return reason, lines, length_known, has_date


def _relayed(
    headers: Iterable[tuple[bytes, bytes]], drop: frozenset[bytes]
) -> tuple[bytes, bool, bool, list[bytes]]:
    """The lines that pass ``drop``; Content-Length and Date seen; Connection values."""
    lines: list[bytes] = []
    connection: list[bytes] = []
    length_known = has_date = False
    for name, value in headers:
        lower = name.lower()
        if lower in drop:
            if lower == b"connection":
                connection.append(value)
            continue
        if lower == b"content-length":
            length_known = True
        elif lower == b"date":
            has_date = True
        lines += (name, b": ", value, b"\r\n")  # one copy, in the join
    return b"".join(lines), length_known, has_date, connection


@functools.lru_cache(maxsize=64)
def _named_by_connection(values: bytes) -> frozenset[bytes]:
    """Header names a response's Connection values add to the hop-by-hop ones."""
    names = _listed([values.decode("latin-1")])
    return frozenset(name.encode("latin-1") for name in names - HOP_BY_HOP)


def request_head(
    request: TrafficRequest, route: Route, target: Target, identity: Identity
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
    if _CONNECTION in headers:
        drop = drop | _listed(headers.getall(_CONNECTION))
    for name, value in headers.items():
        lower = name.lower()
        # Some agent servers read "_" as "-": X_Auth_Subject must not pass
        # for the gateway's own X-Auth-Subject.
        if lower in drop or ("_" in lower and lower.replace("_", "-") in drop):
            continue
        lines += (name, ": ", value, "\r\n")  # one copy, in the join
    assert identity.lines is not None
    lines.append(identity.lines)

    peer = request.remote
    prior = headers.getall(_FORWARDED_FOR, ())
    forwarded_for = ", ".join((*prior, peer)) if prior else peer
    lines.append(
        f"X-Forwarded-For: {forwarded_for}\r\nX-Forwarded-Proto: {request.scheme}\r\n"
    )
    if request.host is not None:
        lines.append(f"X-Forwarded-Host: {request.host}\r\n")
    lines.append(_framing(request))
    return "".join(lines).encode("utf-8", "surrogateescape")


def _framing(request: TrafficRequest) -> str:
    """The body framing sent upstream: always ours, never the caller's as-is."""
    if request.body is not None:
        length = request.content_length
        if length is None:
            return "Transfer-Encoding: chunked\r\n\r\n"
        return f"Content-Length: {length}\r\n\r\n"
    if request.content_length is not None:
        return "Content-Length: 0\r\n\r\n"
    return "\r\n"


def _expects_continue(request: TrafficRequest) -> bool:
    expect = request.headers.get(_EXPECT)
    return expect is not None and expect.lower() == "100-continue"


class Proxy:
    """Forwards requests to their agents over one connection pool per worker."""

    _loop: asyncio.AbstractEventLoop  # set by start()

    def __init__(
        self,
        table: PolicyTable,
        *,
        connection_limit: int = 0,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
    ) -> None:
        self._table = table
        self._pool = UpstreamPool(
            connection_limit=connection_limit, idle_timeout=idle_timeout_s
        )

    async def start(self) -> None:
        """Take the loop; connections are opened as requests need them."""
        # Held, not asked for per request: that costs a getpid() system call.
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        await self._pool.close()

    async def handle(self, request: TrafficRequest) -> None:
        """The traffic port's only handler."""
        if request.version not in _VERSIONS:
            UNROUTED.answered(505)
            request.keep_alive = False
            request.send_error(
                505, "http_version_not_supported", "Only HTTP/1.0 and 1.1 are served"
            )
            return
        try:
            target = split_target(request.target)
        except InvalidTarget as exc:
            UNROUTED.answered(400)
            request.send_error(400, "bad_request", str(exc))
            return

        route = self._table.routes.get((target.project, target.agent))
        if route is None:
            UNROUTED.answered(404)
            request.send_error(404, "not_found", "No agent is deployed here")
            return

        try:
            identity = route.authenticator.check(request.headers)
            if not isinstance(identity, Identity):
                identity = await identity
        except AuthFailure as failure:
            route.metrics.answered(failure.status)
            request.send_error(
                failure.status, failure.error, failure.message, failure.headers
            )
            return

        # Forwarded here, not in a coroutine of its own: each layer of
        # coroutines costs every request some 1,100 instructions.
        if identity.lines is None:
            route.metrics.answered(502)
            request.send_error(
                502, "bad_gateway", "The identity cannot be forwarded to the agent"
            )
            return
        head = request_head(request, route, target, identity)
        if _expects_continue(request):
            request.send_continue()

        body = request.body
        loop = self._loop
        started = loop.time()
        try:
            upstream = await self._pool.request(
                route.origin,
                head,
                body.read if body is not None else None,
                length=request.content_length,
                head_only=request.method == "HEAD",
                timeout_s=route.timeout_s,
            )
        except UpstreamTimeout:
            route.metrics.answered(504)
            request.send_error(
                504, "gateway_timeout", "The agent did not answer in time"
            )
            return
        except UpstreamError:
            route.metrics.answered(502)
            request.send_error(502, "bad_gateway", "The agent could not be reached")
            return

        route.metrics.latency.observe(loop.time() - started)
        route.metrics.answered(upstream.status)
        await _relay(request, upstream, route.timeout_s)


async def _relay(
    request: TrafficRequest, upstream: UpstreamResponse, silence_s: float
) -> None:
    """Stream the upstream response to the caller as it arrives.

    When body bytes came with the head, they leave with it in one write (and
    the end of the body too, when that is in); otherwise the caller has the
    head at once, as an SSE client expects.
    """
    reason, lines, length_known, has_date = relay_head(upstream)
    try:
        # Read at once, without a coroutine, what is in already: a short
        # answer's body and its end usually come with its head.
        data = upstream.read_ready() if upstream.readable else b""
        last = upstream.ended
        if last and data:
            upstream.read_ready()  # the end: the connection is released
        request.send_head(
            upstream.status,
            reason,
            lines,
            length_known=length_known,
            has_date=has_date,
            data=data,
            last=last,
        )
        while not last:
            data = await upstream.read(silence_s)
            last = upstream.ended
            if not data:
                break
            if last:
                upstream.read_ready()
                break
            await request.send_body(data)
        if not request.finished:
            request.end(data)
    except (UpstreamError, ConnectionError):
        upstream.close()
        if not request.started:
            request.send_error(502, "bad_gateway", "The agent broke off its answer")
            return
        # Mid-stream, the status is already sent: the only honest signal
        # left is to cut the caller's connection, so a truncated body is
        # never mistaken for a complete one.
        request.abort()
    except BaseException:
        upstream.close()
        raise
