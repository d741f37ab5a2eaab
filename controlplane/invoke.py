"""The ``test`` call: invoke a deployed agent through its gateway, as a caller would.

For an ``api_key`` deployment the control plane holds a hidden, short-lived
key of its own per agent and environment. It is committed like any key (so
the gateway enforces it as usual), never listed and never answered; its
secret lives only in this process's memory, and is reused while fresh so
that repeated test calls do not spend a revision each.

The key is sent only once every live gateway worker enforces the deployment
the call read (its ``api_key`` route strips the key before the agent), and
whatever the answer echoes of it is redacted, in any header and in the raw
body, before the answer is encoded.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import aiohttp
import msgspec
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from controlplane.apikeys import ApiKey, apikey_record, mint, replace_key
from controlplane.changes import Plan, commit
from controlplane.deployments import load_deployment
from controlplane.errors import ApiError, Conflict, NotFound, ValidationFailed
from controlplane.propagation import wait_for
from controlplane.records import Deployment, deployment_record, read
from controlplane.routing import Route, json_response, name_param
from controlplane.state import STORE
from gateway.store import Store

__all__ = [
    "HIDDEN_KEY_NAME",
    "HIDDEN_KEY_TTL_S",
    "MAX_RESPONSE_BYTES",
    "GatewayTimeout",
    "GatewayUnreachable",
    "NotPropagated",
    "TestBody",
    "TestKeys",
    "TestView",
    "routes",
    "setup",
]

#: Outside the names the API accepts, so no operator's key can take it.
HIDDEN_KEY_NAME = "_test"
HIDDEN_KEY_TTL_S = 600.0
#: A held key is reused only while it has at least this long to live, so a
#: request sent with it cannot outlive it.
_REUSE_MIN_S = 300.0
#: How long a new key may take to reach the live gateway workers.
_PROPAGATION_S = 5.0
#: The whole test call, from connecting to the last byte read.
TIMEOUT_S = 30.0
MAX_RESPONSE_BYTES = 1 << 20
#: What the hidden key is replaced with wherever an answer carries it.
REDACTED = "[redacted]"
#: Content codings decoded to look for the key in a compressed answer; zlib
#: reads either header (gzip, or zlib's own for deflate) with these bits.
_ZLIB_CODINGS = frozenset({"gzip", "x-gzip", "deflate"})
_ZLIB_ANY_HEADER = 32 + zlib.MAX_WBITS
#: How much of a compressed answer is decoded at most (on the event loop,
#: some 20 ms at worst); one that decodes to more is withheld, since the key
#: could hide past the limit.
_DECODE_LIMIT = 4 * MAX_RESPONSE_BYTES
#: Headers the HTTP client would add of its own: the request goes as given,
#: and without an Accept-Encoding of ours no agent is asked to compress.
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "Content-Type", "User-Agent")

BodyEncoding = Literal["utf-8", "base64"]
Method = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
HeaderValue = Annotated[str, msgspec.Meta(max_length=8192)]
#: An HTTP field name (an RFC 9110 token), and what no value may hold since
#: it would end the line. Checked in code rather than in the schema, so that
#: the answer can name the offending header.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}")
_HEADER_BREAK = re.compile(r"[\r\n\x00]")
#: Visible ASCII only: the path is sent exactly as given.
_PATH = re.compile(r"/[!-~]*")
_DOT_SEGMENT = re.compile(r"(?:%2e|\.){1,2}", re.IGNORECASE)

#: Headers the client computes or that only make sense hop by hop.
_RESERVED = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
        "proxy-authorization",
    }
)


class TestBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST …/test``: the request to send, the path below the agent."""

    __test__ = False  # not a pytest test class, despite its name

    method: Method = "GET"
    path: Annotated[str, msgspec.Meta(min_length=1, max_length=2048)] = "/"
    headers: Annotated[dict[str, HeaderValue], msgspec.Meta(max_length=64)] = {}
    body: Annotated[str, msgspec.Meta(max_length=512 * 1024)] = ""


class TestView(msgspec.Struct, kw_only=True):
    """What the gateway answered.

    ``body`` is text when the answer is UTF-8, otherwise base64
    (``body_encoding`` says which); ``truncated`` when it was longer than
    the call reads, or still streaming at the deadline. Repeated headers are
    joined with ``, ``. The hidden key of an ``api_key`` test is replaced by
    ``[redacted]`` wherever it appears; a compressed body that holds it, or
    is too large to check, is replaced by ``[redacted]`` as a whole.
    """

    __test__ = False

    status: int
    headers: dict[str, str]
    body: str
    body_encoding: BodyEncoding
    truncated: bool


class GatewayUnreachable(ApiError):
    """The environment's gateway could not be reached."""

    status = 502
    code = "gateway_unreachable"


class GatewayTimeout(ApiError):
    """The gateway sent no answer in time."""

    status = 504
    code = "gateway_timeout"


class NotPropagated(ApiError):
    """Some live gateway worker does not enforce the deployment yet."""

    status = 503
    code = "not_propagated"


# --- the hidden key ---------------------------------------------------------


@dataclass(frozen=True)
class _Held:
    key: str
    key_hash: str
    expires_at: float
    revision: int


class TestKeys:
    """Hidden test keys this process minted, by (environment, project, agent)."""

    __test__ = False

    def __init__(self) -> None:
        self._held: dict[tuple[str, str, str], _Held] = {}
        self._locks: dict[tuple[str, str, str], asyncio.Lock] = {}

    async def key_for(self, store: Store, where: tuple[str, str, str]) -> _Held:
        """A fresh hidden key for ``where``: the held one, or a new one.

        One minting at a time per agent, so that concurrent test calls share a
        key instead of revoking each other's.
        """
        lock = self._locks.setdefault(where, asyncio.Lock())
        async with lock:
            held = self._held.get(where)
            if held is None or not await _usable(store, where, held):
                held = await _mint(store, where)
                self._held[where] = held
            return held


async def _usable(store: Store, where: tuple[str, str, str], held: _Held) -> bool:
    if held.expires_at - time.time() < _REUSE_MIN_S:
        return False
    # Another control-plane process may have replaced it.
    record, _ = await read(store, apikey_record(*where, HIDDEN_KEY_NAME), ApiKey)
    return record is not None and record.key_hash == held.key_hash


async def _mint(store: Store, where: tuple[str, str, str]) -> _Held:
    env, project, agent = where
    expires = float(int(time.time() + HIDDEN_KEY_TTL_S))
    key, record = mint(HIDDEN_KEY_NAME, expires, hidden=True)

    async def plan(_: int) -> Plan[None]:
        await _deployed_with_keys(store, env, project, agent)
        old, _raw = await read(store, apikey_record(*where, HIDDEN_KEY_NAME), ApiKey)
        records, policies = replace_key(where, HIDDEN_KEY_NAME, old, record)
        return Plan(None, records=records, policies=policies)

    revision, _ = await commit(store, env, plan)
    return _Held(key, record.key_hash, expires, revision)


async def _deployed_with_keys(store: Store, env: str, project: str, agent: str) -> None:
    """Re-checked at commit time: the deployment may have changed meanwhile."""
    record, _ = await read(store, deployment_record(project, agent, env), Deployment)
    if record is None:
        raise NotFound("deployment", f"{project}/{agent} in {env}")
    if record.endpoint_auth.type == "oauth":
        raise _unavailable(project, agent, env)
    if record.endpoint_auth.type != "api_key":
        raise Conflict(
            "concurrent_change",
            f"{project}/{agent} was deployed with {record.endpoint_auth.type!r} "
            f"in {env!r} while the test call started; retry",
        )


def _unavailable(project: str, agent: str, env: str) -> Conflict:
    return Conflict(
        "test_unavailable",
        f"{project}/{agent} uses oauth in {env!r}: the control plane cannot "
        "mint a token for it, so it cannot be tested from here",
    )


async def _enforced(store: Store, env: str, revision: int) -> None:
    """Return once every live worker has applied ``revision``; 503 if not in time.

    A worker still at an older revision may serve the agent's previous route,
    one without ``api_key``, which would pass the hidden key to the agent.
    A deployment committed after the call read its own is not waited for:
    that window is as short as the request's flight, and closing it would
    need the gateway to strip the key on every route.
    """
    state = await wait_for(store, env, revision, _PROPAGATION_S)
    if state.pending:
        raise NotPropagated(
            f"Revision {revision} has not reached every live gateway worker of "
            f"{env!r} within {_PROPAGATION_S:g} s; the test call was not sent",
            {"revision": revision, "pending": state.pending},
        )


# --- checking the request ---------------------------------------------------


def _check_path(path: str) -> str:
    if _PATH.fullmatch(path) is None:
        raise ValidationFailed(
            "$.path", "must start with '/' and hold only visible ASCII characters"
        )
    if "#" in path:
        raise ValidationFailed("$.path", "must not carry a fragment")
    route = path.partition("?")[0]
    if any(_DOT_SEGMENT.fullmatch(s) for s in route.split("/")):
        # A dot segment would climb out of this agent to another one.
        raise ValidationFailed("$.path", "must not contain '.' or '..' segments")
    return path


def _check_headers(headers: dict[str, str], credential: str | None) -> None:
    for name, value in headers.items():
        if _HEADER_NAME.fullmatch(name) is None:
            raise ValidationFailed("$.headers", f"{name!r} is not a header name")
        if _HEADER_BREAK.search(value) is not None:
            raise ValidationFailed(
                f"$.headers.{name}", "must not contain CR, LF or NUL"
            )
        lower = name.lower()
        if lower in _RESERVED:
            raise ValidationFailed(f"$.headers.{name}", "is set by the HTTP client")
        if credential is not None and lower == credential.lower():
            raise ValidationFailed(
                f"$.headers.{name}", "carries the test call's own API key"
            )


# --- sending it -------------------------------------------------------------


@dataclass(frozen=True)
class _Outgoing:
    method: str
    url: URL
    headers: CIMultiDict[str]
    body: bytes


def _outgoing(body: TestBody, gateway_url: str, project: str, agent: str) -> _Outgoing:
    url = URL(f"{gateway_url}/{project}/{agent}{body.path}", encoded=True)
    data = body.body.encode()
    return _Outgoing(body.method, url, CIMultiDict(body.headers), data)


async def _send(
    session: aiohttp.ClientSession, out: _Outgoing, secret: str | None
) -> TestView:
    """Send ``out``; the answer, with ``secret`` redacted from it if given."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT_S
    response = await _request(session, out, deadline)

    # Read past the limit by one key's length, so that a key straddling it
    # is still whole when it is redacted.
    limit = MAX_RESPONSE_BYTES + 1 + (len(secret) if secret else 0)
    async with response:
        body, ended = await _read(response, deadline, limit)
    headers = _joined(response)
    if secret is not None:
        headers, body = _scrub(headers, body, ended, secret)
    return _view(response.status, headers, body, ended)


async def _request(
    session: aiohttp.ClientSession, out: _Outgoing, deadline: float
) -> aiohttp.ClientResponse:
    origin = out.url.origin()
    try:
        async with asyncio.timeout_at(deadline):
            return await session.request(
                out.method,
                out.url,
                headers=out.headers,
                data=out.body or None,
                allow_redirects=False,
            )
    except TimeoutError:
        raise GatewayTimeout(
            f"The gateway at {origin} sent no answer within {TIMEOUT_S:g} s"
        ) from None
    except aiohttp.ClientError as error:
        raise GatewayUnreachable(
            f"The gateway at {origin} cannot be reached: {type(error).__name__}"
        ) from None


async def _read(
    response: aiohttp.ClientResponse, deadline: float, limit: int
) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of the body, and whether it ended within them."""
    body = bytearray()
    try:
        async with asyncio.timeout_at(deadline):
            while len(body) < limit:
                chunk = await response.content.read(limit - len(body))
                if not chunk:
                    return bytes(body), True
                body += chunk
    except (TimeoutError, aiohttp.ClientError):
        pass  # still streaming at the deadline, or cut short
    return bytes(body), False


def _joined(response: aiohttp.ClientResponse) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in response.headers.items():
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def _view(status: int, headers: dict[str, str], body: bytes, ended: bool) -> TestView:
    truncated = not ended or len(body) > MAX_RESPONSE_BYTES
    body = body[:MAX_RESPONSE_BYTES]
    try:
        encoding: BodyEncoding = "utf-8"
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(body).decode(), "base64"
    return TestView(
        status=status,
        headers=headers,
        body=text,
        body_encoding=encoding,
        truncated=truncated,
    )


# --- keeping the hidden key in ----------------------------------------------


def _scrub(
    headers: dict[str, str], body: bytes, ended: bool, secret: str
) -> tuple[dict[str, str], bytes]:
    """The hidden key never leaves this process, even if something echoed it.

    Done on the raw bytes, before they are decoded or cut to the limit.
    """
    kept = {name: value.replace(secret, REDACTED) for name, value in headers.items()}
    coding = headers.get("Content-Encoding", "identity").strip().lower()
    if _compressed_holds(body, coding, secret.encode()):
        kept.pop("Content-Encoding", None)
        kept.pop("Content-Length", None)
        return kept, REDACTED.encode()

    body = body.replace(secret.encode(), REDACTED.encode())
    return kept, body if ended else _cut_partial(body, secret.encode())


def _cut_partial(body: bytes, secret: bytes) -> bytes:
    """Without a trailing start of the key: the rest of it never arrived."""
    for size in range(min(len(secret) - 1, len(body)), 0, -1):
        if body.endswith(secret[:size]):
            return body[:-size]
    return body


def _compressed_holds(body: bytes, coding: str, secret: bytes) -> bool:
    """Whether a compressed body holds the key, or cannot be shown not to.

    Only gzip and deflate are decoded. A caller who asks for another coding
    (the control plane asks for none of its own) gets it as sent: checking
    brotli or zstd would need a decoder for each.
    """
    if coding not in _ZLIB_CODINGS:
        return False
    decoder = zlib.decompressobj(_ZLIB_ANY_HEADER)
    try:
        decoded = decoder.decompress(body, _DECODE_LIMIT)
    except zlib.error:
        return True
    too_much = bool(decoder.unconsumed_tail or decoder.unused_data)
    return too_much or secret in decoded


# --- the handler ------------------------------------------------------------

TEST_KEYS = web.AppKey("test_keys", TestKeys)
TEST_CLIENT = web.AppKey("test_client", aiohttp.ClientSession)


async def post_test(request: web.Request, body: TestBody) -> web.StreamResponse:
    project, agent = name_param(request, "project"), name_param(request, "agent")
    env = name_param(request, "env")
    deployment, environment = await load_deployment(request, project, agent, env)
    auth = deployment.endpoint_auth
    if auth.type == "oauth":
        raise _unavailable(project, agent, env)

    header = auth.api_key.header_name if auth.api_key else None
    _check_path(body.path)
    _check_headers(body.headers, header)
    out = _outgoing(body, environment.gateway_url, project, agent)
    store, session = request.app[STORE], request.app[TEST_CLIENT]
    if header is None:
        await _enforced(store, env, deployment.revision)
        return json_response(await _send(session, out, None))

    held = await request.app[TEST_KEYS].key_for(store, (env, project, agent))
    await _enforced(store, env, max(held.revision, deployment.revision))
    out.headers[header] = held.key
    return json_response(await _send(session, out, held.key))


async def _client(app: web.Application) -> AsyncIterator[None]:
    # Its own session: no cookies kept between test calls, bodies untouched,
    # no headers of its own beyond those HTTP needs (Host, Content-Length).
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=_NO_AUTO_HEADERS,
    ) as session:
        app[TEST_CLIENT] = session
        yield


def setup(app: web.Application) -> None:
    """State the ``test`` call keeps in the control-plane process."""
    app[TEST_KEYS] = TestKeys()
    app.cleanup_ctx.append(_client)


routes: list[Route[Any]] = [
    Route(
        "POST",
        "/projects/{project}/agents/{agent}/environments/{env}/test",
        post_test,
        "Invoke the deployed agent through the gateway and return its answer",
        TestBody,
        {200: TestView},
    ),
]
