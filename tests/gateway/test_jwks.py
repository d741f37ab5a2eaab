"""Tests of gateway/jwks.py: parsing JWK sets, and fetching them from a real server."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.auth import AuthFailure
from gateway.jwks import (
    MAX_DOCUMENT_BYTES,
    MAX_KEYS,
    Keyring,
    KeySource,
    parse_jwks,
)
from gateway.oauth import IdentityProviders, OAuthAuthenticator
from gateway.policy import IdentityProviderPolicy, OAuthSettings
from tests.fixtures.tls import Tls
from tests.gateway.tokenkit import ISSUER, b64, claims, ec_key, jwk, rsa_key, sign

ServerFactory = Callable[..., Awaitable[TestServer]]

EC_A, EC_B = ec_key("P-256", 1), ec_key("P-256", 2)


# --- parsing --------------------------------------------------------------------


def test_parse_jwks_skips_each_unusable_key_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    small = jwk(rsa_key(1024), "rsa-1024")
    off_curve = jwk(ec_key(), "off-curve")
    off_curve["y"] = off_curve["x"]
    private = jwk(ec_key(), "private", d=b64(b"\x01" * 32))
    document = {
        "keys": [
            small,
            jwk(rsa_key(), "enc", use="enc"),
            jwk(rsa_key(), "wrong-alg", alg="ES256"),
            jwk(rsa_key(), "hmac-alg", alg="HS256"),
            jwk(rsa_key(), "alg-list", alg=["RS256"]),
            jwk(EC_B, "alg-object", alg={"name": "ES256"}),
            {"kty": "XYZ", "kid": "unknown-kty"},
            {"kty": "EC", "crv": "secp256k1", "x": "AA", "y": "AA", "kid": "bad-curve"},
            {"kty": "OKP", "crv": "X25519", "x": b64(b"\x01" * 32), "kid": "x25519"},
            {"kty": "oct", "k": "c2VjcmV0", "kid": "oct"},
            jwk(rsa_key(), "ops", key_ops=["encrypt"]),
            {"kty": "RSA", "kid": "bad-b64", "n": "AQAB==", "e": "AQAB"},
            off_curve,
            private,
            "not an object",
            jwk(rsa_key(), "good-rsa", alg="PS256", use="sig"),
            jwk(EC_A, "good-ec"),
        ]
    }
    with caplog.at_level(logging.WARNING, logger="agw.gateway.jwks"):
        keys = parse_jwks("idp-x", document)

    assert [(k.kid, sorted(k.algorithms)) for k in keys.keys] == [
        ("good-rsa", ["PS256"]),
        ("good-ec", ["ES256"]),
    ]
    reasons = [r.getMessage() for r in caplog.records]
    prefix = "identity provider idp-x: JWK "
    assert [r.removeprefix(prefix) for r in reasons] == [
        "'rsa-1024' skipped: RSA key shorter than 2048 bits",
        "'enc' skipped: use is not sig",
        "'wrong-alg' skipped: alg does not fit the key type",
        "'hmac-alg' skipped: alg does not fit the key type",
        "'alg-list' skipped: alg is not a string",
        "'alg-object' skipped: alg is not a string",
        "'unknown-kty' skipped: unknown key type",
        "'bad-curve' skipped: unsupported curve",
        "'x25519' skipped: unsupported curve",
        "'oct' skipped: symmetric keys are never used",
        "'ops' skipped: key_ops does not allow verify",
        "'bad-b64' skipped: member n is not base64url",
        "'off-curve' skipped: point is not on the curve",
        "'private' skipped: private key published in a JWK set",
        "'#14' skipped: not a JSON object",
    ]
    assert all(small["n"][:40] not in r and private["d"] not in r for r in reasons)


def test_parse_jwks_reuses_unchanged_key_objects() -> None:
    first = parse_jwks("idp", {"keys": [jwk(EC_A, "a"), jwk(EC_B, "b")]})
    second = parse_jwks("idp", {"keys": [jwk(EC_B, "b"), jwk(rsa_key(), "c")]}, first)
    assert second.keys[0] is first.keys[1]
    assert second.keys[1] is not first.keys[0]


def test_parse_jwks_keeps_a_key_with_an_integer_member_of_any_size() -> None:
    big = jwk(EC_A, "a", x_created=10**30, x_meta={"serial": -(2**80)})
    first = parse_jwks("idp", {"keys": [big, jwk(EC_B, "b")]})
    again = parse_jwks("idp", {"keys": [big]}, first)
    assert [k.kid for k in first.keys] == ["a", "b"]
    assert again.keys == (first.keys[0],)


def test_parse_jwks_keeps_the_first_max_keys_usable_keys(
    caplog: pytest.LogCaptureFixture,
) -> None:
    usable = [jwk(EC_A, f"k{i}") for i in range(MAX_KEYS + 1)]
    document = {"keys": ["unusable", *usable, *["never parsed"] * 99]}
    with caplog.at_level(logging.WARNING, logger="agw.gateway.jwks"):
        keys = parse_jwks("idp-x", document)

    assert [k.kid for k in keys.keys] == [f"k{i}" for i in range(MAX_KEYS)]
    assert [r.getMessage() for r in caplog.records] == [
        "identity provider idp-x: JWK '#0' skipped: not a JSON object",
        "identity provider idp-x: 100 JWK(s) after the first 64 usable keys dropped",
    ]


def test_keyset_candidates_are_every_fitting_key_in_set_order() -> None:
    keys = parse_jwks("idp", {"keys": [jwk(ec_key("P-256", n)) for n in range(10)]})
    shared = parse_jwks("idp", {"keys": [jwk(EC_A, "same")] * 10})
    assert keys.candidates("ES256", None) == keys.keys
    assert shared.candidates("ES256", "same") == shared.keys
    assert keys.candidates("RS256", None) == ()
    assert keys.candidates("ES256", "unknown") == ()


# --- a JWKS server of the test's own ----------------------------------------------


class JwksServer:
    """Serves a JWK set and a discovery document, counting JWK set fetches."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = [jwk(EC_A, "a")]
        self.status = 200
        self.delay = 0.0
        self.body: bytes | None = None
        self.fetches = 0
        self.base = ""
        self.discovery_issuer: str | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/jwks", self._jwks)
        app.router.add_get("/moved", self._moved)
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        return app

    async def _jwks(self, request: web.Request) -> web.StreamResponse:
        self.fetches += 1
        await asyncio.sleep(self.delay)
        if self.body is not None:
            return web.Response(body=self.body, content_type="application/json")
        return web.json_response({"keys": self.keys}, status=self.status)

    async def _moved(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(self.base + "/jwks")

    async def _discovery(self, request: web.Request) -> web.Response:
        issuer = self.discovery_issuer or self.base
        return web.json_response({"issuer": issuer, "jwks_uri": self.base + "/jwks"})


@pytest.fixture
async def jwks_server(aiohttp_server: ServerFactory) -> JwksServer:
    state = JwksServer()
    server = await aiohttp_server(state.app())
    state.base = str(server.make_url("")).rstrip("/")
    return state


IdpsFactory = Callable[..., IdentityProviders]


@pytest.fixture
async def make_idps() -> AsyncIterator[IdpsFactory]:
    made: list[IdentityProviders] = []

    def make(**options: float) -> IdentityProviders:
        made.append(IdentityProviders(**options))
        return made[-1]

    yield make
    for idps in made:
        await idps.close()


def idp_policy(server: JwksServer, **overrides: Any) -> IdentityProviderPolicy:
    fields: dict[str, Any] = {
        "name": "remote",
        "issuer": server.base,
        "jwks_uri": server.base + "/jwks",
    }
    fields.update(overrides)
    return IdentityProviderPolicy(**fields)


def token_for(server: JwksServer, private: Any = EC_A, kid: str | None = "a") -> str:
    return "Bearer " + sign(private, "ES256", kid, payload=claims(iss=server.base))


async def authenticate(idps: IdentityProviders, value: str) -> tuple[Any, ...]:
    auth = OAuthAuthenticator(OAuthSettings(identity_providers=["remote"]), idps)
    headers = CIMultiDictProxy(CIMultiDict([("Authorization", value)]))
    try:
        identity = await auth.authenticate(headers)
    except AuthFailure as failure:
        return (failure.status, failure.error, failure.headers)
    return (200, identity.headers[2][1])


async def eventually(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


UNKNOWN_KEY = (
    401,
    "invalid_token",
    {
        "WWW-Authenticate": 'Bearer realm="agent-gateway", error="invalid_token", '
        'error_description="unknown key for the token\'s algorithm"'
    },
)
UNAVAILABLE = (503, "auth_unavailable", {"Retry-After": "5"})


# --- fetching -------------------------------------------------------------------


async def test_keyring_fetches_by_jwks_uri(
    jwks_server: JwksServer, make_idps: IdpsFactory
) -> None:
    idps = make_idps()
    idps.apply("remote", idp_policy(jwks_server))
    assert await authenticate(idps, token_for(jwks_server)) == (200, "remote")
    assert jwks_server.fetches == 1


async def test_keyring_fetches_by_discovery(
    jwks_server: JwksServer, make_idps: IdpsFactory
) -> None:
    idps = make_idps()
    idps.apply("remote", idp_policy(jwks_server, jwks_uri=None, discovery=True))
    assert await authenticate(idps, token_for(jwks_server)) == (200, "remote")


async def test_keyring_discovery_of_another_issuer_is_refused(
    jwks_server: JwksServer, make_idps: IdpsFactory
) -> None:
    jwks_server.discovery_issuer = "https://elsewhere.test"
    idps = make_idps()
    idps.apply("remote", idp_policy(jwks_server, jwks_uri=None, discovery=True))
    assert await authenticate(idps, token_for(jwks_server)) == UNAVAILABLE
    assert jwks_server.fetches == 0


async def test_keyring_unknown_kids_cause_one_fetch_per_cooldown(
    jwks_server: JwksServer, make_idps: IdpsFactory
) -> None:
    idps = make_idps(cooldown_s=0.3)
    idps.apply("remote", idp_policy(jwks_server))
    assert await authenticate(idps, token_for(jwks_server)) == (200, "remote")
    await asyncio.sleep(0.35)  # let the cooldown after the first fetch run out
    jwks_server.delay = 0.05  # keep the refetch in flight while others arrive

    tokens = [token_for(jwks_server, kid=secrets.token_hex(8)) for _ in range(1000)]
    answers = await asyncio.gather(*(authenticate(idps, t) for t in tokens))

    assert all(answer == UNKNOWN_KEY for answer in answers)
    assert jwks_server.fetches == 2


async def test_keyring_rotation_new_key_passes_first_try(
    jwks_server: JwksServer, make_idps: IdpsFactory
) -> None:
    idps = make_idps(cooldown_s=0.2)
    idps.apply("remote", idp_policy(jwks_server))
    assert await authenticate(idps, token_for(jwks_server)) == (200, "remote")

    jwks_server.keys = [jwk(EC_A, "a"), jwk(EC_B, "b")]
    await asyncio.sleep(0.25)
    assert await authenticate(idps, token_for(jwks_server, EC_B, "b")) == (
        200,
        "remote",
    )
    assert jwks_server.fetches == 2


async def test_keyring_within_cooldown_does_not_refetch(
    jwks_server: JwksServer, make_idps: IdpsFactory
) -> None:
    idps = make_idps(cooldown_s=60)
    idps.apply("remote", idp_policy(jwks_server))
    assert await authenticate(idps, token_for(jwks_server)) == (200, "remote")
    jwks_server.keys = [jwk(EC_B, "b")]
    assert await authenticate(idps, token_for(jwks_server, EC_B, "b")) == UNKNOWN_KEY
    assert jwks_server.fetches == 1


@pytest.mark.parametrize("failure", ["status", "garbage", "not a set", "too large"])
async def test_keyring_keeps_last_good_keys(
    jwks_server: JwksServer, make_idps: IdpsFactory, failure: str
) -> None:
    idps = make_idps(cooldown_s=0.01)
    idps.apply("remote", idp_policy(jwks_server, jwks_refresh_s=0.02))
    assert await authenticate(idps, token_for(jwks_server)) == (200, "remote")

    if failure == "status":
        jwks_server.status = 500
    else:
        jwks_server.body = {
            "garbage": b"{not json",
            "not a set": b'{"keys": 5}',
            "too large": b'{"keys": [], "pad": "' + b"x" * MAX_DOCUMENT_BYTES + b'"}',
        }[failure]
    seen = jwks_server.fetches
    await eventually(lambda: jwks_server.fetches >= seen + 2)

    assert await authenticate(idps, token_for(jwks_server)) == (200, "remote")


async def test_keyring_background_refresh_picks_up_new_keys(
    jwks_server: JwksServer, make_idps: IdpsFactory
) -> None:
    idps = make_idps(cooldown_s=0.01)
    idps.apply("remote", idp_policy(jwks_server, jwks_refresh_s=0.02))
    old = token_for(jwks_server)
    for _ in range(2):  # kept in the cache on its second verification
        assert await authenticate(idps, old) == (200, "remote")
    assert len(idps.cache) == 1
    jwks_server.keys = [jwk(EC_B, "b")]
    seen = jwks_server.fetches
    await eventually(lambda: jwks_server.fetches >= seen + 2)

    assert await authenticate(idps, token_for(jwks_server, EC_B, "b")) == (
        200,
        "remote",
    )
    # The old key is no longer published: the token verified with it and
    # cached stops working too.
    assert await authenticate(idps, old) == UNKNOWN_KEY


@pytest.mark.parametrize("failure", ["status", "slow", "unreachable"])
async def test_keyring_never_fetched_is_503(
    jwks_server: JwksServer, make_idps: IdpsFactory, failure: str
) -> None:
    idps = make_idps(timeout_s=0.2)
    policy = idp_policy(jwks_server)
    if failure == "status":
        jwks_server.status = 500
    elif failure == "slow":
        jwks_server.delay = 2.0
    else:
        policy = idp_policy(jwks_server, jwks_uri="http://127.0.0.1:9/jwks")
    idps.apply("remote", policy)
    assert await authenticate(idps, token_for(jwks_server)) == UNAVAILABLE


async def test_apply_changed_idp_keeps_keys_of_same_source(
    jwks_server: JwksServer, make_idps: IdpsFactory
) -> None:
    idps = make_idps()
    idps.apply("remote", idp_policy(jwks_server))
    assert await authenticate(idps, token_for(jwks_server)) == (200, "remote")
    keyring = idps.get("remote").keyring  # type: ignore[union-attr]

    idps.apply("remote", idp_policy(jwks_server, audiences=["x"], jwks_refresh_s=600))
    state = idps.get("remote")
    assert state is not None and state.keyring is keyring
    assert state.audiences == frozenset({"x"}) and keyring.refresh_s == 600

    idps.apply(
        "remote", idp_policy(jwks_server, jwks_uri=jwks_server.base + "/jwks?v=2")
    )
    assert idps.get("remote").keyring is not keyring  # type: ignore[union-attr]
    assert jwks_server.fetches == 1


async def test_keyring_remote_set_with_odd_jwk_keeps_the_others(
    jwks_server: JwksServer, make_idps: IdpsFactory
) -> None:
    jwks_server.keys = [
        jwk(EC_B, "odd", alg=["ES256"]),
        jwk(EC_A, "a", x_created=10**30),
    ]
    idps = make_idps()
    idps.apply("remote", idp_policy(jwks_server))
    assert await authenticate(idps, token_for(jwks_server)) == (200, "remote")
    assert await authenticate(idps, token_for(jwks_server, EC_B, "odd")) == (
        UNKNOWN_KEY
    )


async def test_keyring_inline_set_without_keys_is_503(make_idps: IdpsFactory) -> None:
    idps = make_idps()
    policy = IdentityProviderPolicy(name="remote", issuer=ISSUER, jwks={"keys": 5})
    idps.apply("remote", policy)
    assert await authenticate(idps, "Bearer " + sign(EC_A, "ES256", "a")) == (
        UNAVAILABLE
    )


async def test_keyring_redirect_is_a_failed_fetch(
    jwks_server: JwksServer, make_idps: IdpsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    idps = make_idps()
    moved = jwks_server.base + "/moved"
    idps.apply("remote", idp_policy(jwks_server, jwks_uri=moved))
    with caplog.at_level(logging.WARNING, logger="agw.gateway.jwks"):
        assert await authenticate(idps, token_for(jwks_server)) == UNAVAILABLE
    assert jwks_server.fetches == 0
    assert [r.getMessage() for r in caplog.records] == [
        f"identity provider remote: keys not fetched: {moved} answered 302, a redirect"
    ]


async def test_keyring_discovery_of_http_jwks_uri_for_https_issuer_is_refused(
    aiohttp_server: ServerFactory, tls: Tls, caplog: pytest.LogCaptureFixture
) -> None:
    async def document(request: web.Request) -> web.Response:
        host = f"127.0.0.1:{request.url.port}"
        keys = f"http://{host}/jwks"
        return web.json_response({"issuer": f"https://{host}", "jwks_uri": keys})

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", document)
    server = await aiohttp_server(app, ssl=tls.server)
    issuer = f"https://127.0.0.1:{server.port}"
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls.client))

    async def sessions() -> aiohttp.ClientSession:
        return session

    keyring = Keyring("remote", KeySource(issuer, None, None, True), sessions)
    with caplog.at_level(logging.WARNING, logger="agw.gateway.jwks"):
        keys = await keyring.ensure_loaded()
    await keyring.close()
    await session.close()
    assert keys.loaded is False
    assert [r.getMessage() for r in caplog.records] == [
        "identity provider remote: keys not fetched: "
        f"{issuer}/.well-known/openid-configuration names a plain http jwks_uri"
    ]


async def test_keyring_refresh_period_shorter_than_cooldown_is_kept(
    jwks_server: JwksServer, make_idps: IdpsFactory
) -> None:
    idps = make_idps(cooldown_s=60)
    idps.apply("remote", idp_policy(jwks_server, jwks_refresh_s=0.05))
    assert await authenticate(idps, token_for(jwks_server)) == (200, "remote")

    jwks_server.keys = [jwk(EC_B, "b")]
    await eventually(lambda: jwks_server.fetches >= 3)
    # Picked up by the refresh: no token could have fetched within the cooldown.
    assert await authenticate(idps, token_for(jwks_server, EC_B, "b")) == (
        200,
        "remote",
    )
