"""The traffic port: route, authenticate and stream-proxy each request.

This module is the hot path. Everything that can be decided once is decided
when a policy is applied (see :mod:`gateway.policies`); a request costs a
path normalization, one dict lookup, the authenticator, a header copy and
the streaming itself. Nothing here logs per request.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import msgspec
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.auth import AuthFailure, Identity
from gateway.metrics import UNROUTED
from gateway.policies import PolicyTable, Route
from gateway.routing import InvalidTarget, Target, split_target

__all__ = [
    "HOP_BY_HOP",
    "Proxy",
    "TrafficServer",
    "error_response",
]

#: RFC 9110 section 7.6.1 hop-by-hop headers, plus the non-standard
#: Proxy-Connection that some clients still send.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

# Request headers the gateway sets itself (or that the upstream connection
# sets), so a caller's copy never goes upstream.
_REQUEST_DROP = HOP_BY_HOP | {
    "host",
    "expect",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
}

# Left for the caller to send or not: the upstream must see the request as
# the caller made it, not with the HTTP client's defaults added.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

_json = msgspec.json.Encoder()


def error_response(
    status: int,
    error: str,
    message: str,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """The gateway's one error shape: ``{"error", "message"}``."""
    body = _json.encode({"error": error, "message": message})
    return web.Response(
        status=status, body=body, content_type="application/json", headers=headers
    )


def _connection_tokens(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """Header names listed in Connection, which are hop-by-hop too."""
    values = headers.getall("Connection", ())
    if not values:
        return frozenset()
    return frozenset(
        token.strip().lower() for value in values for token in value.split(",")
    )


def _copy_headers(
    headers: CIMultiDictProxy[str], drop: frozenset[str]
) -> CIMultiDict[str]:
    drop = drop | _connection_tokens(headers)
    copied: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in drop:
            copied.add(name, value)
    return copied


def upstream_headers(
    request: web.BaseRequest, strip: frozenset[str], identity: Identity
) -> CIMultiDict[str]:
    """The request headers as the upstream receives them."""
    headers = _copy_headers(request.headers, _REQUEST_DROP | strip)
    for name, value in identity.headers:
        headers.add(name, value)

    peer = request.remote or ""
    prior = request.headers.getall("X-Forwarded-For", ())
    headers["X-Forwarded-For"] = ", ".join((*prior, peer)) if prior else peer
    headers["X-Forwarded-Proto"] = request.scheme
    headers["X-Forwarded-Host"] = request.host
    return headers


def _expects_continue(request: web.BaseRequest) -> bool:
    expect = request.headers.get("Expect")
    return expect is not None and expect.lower() == "100-continue"


class Proxy:
    """Forwards requests to their agents over one pooled client per worker."""

    def __init__(self, table: PolicyTable, *, connection_limit: int = 0) -> None:
        self._table = table
        self._connection_limit = connection_limit
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._connection_limit, keepalive_timeout=30
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            timeout=aiohttp.ClientTimeout(total=None),
            trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """The traffic port's only handler."""
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
            identity = await route.authenticator.authenticate(request.headers)
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
        assert self._session is not None
        if _expects_continue(request):
            await request.writer.write(_CONTINUE)

        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            upstream = await self._session.request(
                request.method,
                route.upstream_url(target.rest, target.query),
                headers=upstream_headers(request, route.authenticator.strip, identity),
                data=request.content if request.body_exists else None,
                allow_redirects=False,
                timeout=route.client_timeout,
            )
        except TimeoutError:
            route.metrics.answered(504)
            return error_response(
                504, "gateway_timeout", "The agent did not answer in time"
            )
        except aiohttp.ClientError:
            route.metrics.answered(502)
            return error_response(502, "bad_gateway", "The agent could not be reached")

        route.metrics.latency.observe(loop.time() - started)
        route.metrics.answered(upstream.status)
        return await self._relay(request, upstream)

    async def _relay(
        self, request: web.BaseRequest, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        """Stream the upstream response to the caller as it arrives."""
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=_copy_headers(upstream.headers, HOP_BY_HOP),
        )
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        except (aiohttp.ClientError, TimeoutError, ConnectionError):
            # Mid-stream, the status is already sent: the only honest signal
            # left is to cut the caller's connection, so a truncated body is
            # never mistaken for a complete one.
            upstream.close()
            _abort(request)
            return response
        except BaseException:
            upstream.close()
            raise

        upstream.release()
        return response


def _abort(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


class _TrafficRequestHandler(RequestHandler):
    """Answers malformed requests in the gateway's JSON shape, never echoing them.

    aiohttp's own answer quotes the start of an oversized header line, and it
    logs each one; a gateway must do neither for what any caller can send.
    """

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, LineTooLong):
            response = error_response(
                431,
                "header_too_large",
                "A request header line is longer than the gateway accepts",
            )
        elif isinstance(exc, BadHttpMessage):
            response = error_response(400, "bad_request", "Malformed HTTP request")
        else:
            return super().handle_error(request, status, exc, message)

        response.force_close()
        return response


class TrafficServer(web.Server):
    """aiohttp's low-level server with the gateway's malformed-request answers."""

    def __call__(self) -> RequestHandler:
        # web.Server builds its protocol from these two attributes; building
        # ours from the same keeps every handler argument (limits, timeouts).
        kwargs: dict[str, Any] = self._kwargs
        return _TrafficRequestHandler(self, loop=self._loop, **kwargs)
