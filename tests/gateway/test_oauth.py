"""Tests of gateway/oauth.py: authenticator and diagnosis, against hostile tokens."""

from __future__ import annotations

import ast
import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import auth as auth_module
from gateway import oauth as oauth_module
from gateway import tokens as tokens_module
from gateway.auth import IDENTITY_HEADERS, AuthFailure
from gateway.oauth import IdentityProviders, OAuthAuthenticator, diagnose
from gateway.policy import IdentityProviderPolicy, OAuthSettings
from gateway.tokens import VerificationKey, extract_token, verify_signature
from tests.gateway.tokenkit import (
    ISSUER,
    b64,
    claims,
    compact,
    ec_key,
    ed_key,
    hmac_token,
    jwk,
    pem,
    rsa_key,
    sign,
)

OTHER_ISSUER = "https://other.test"
REALM = 'Bearer realm="agent-gateway"'

RSA, EC, ED = rsa_key(), ec_key(), ed_key()
ATTACKER = rsa_key(2048, 1)
OTHER = rsa_key(2048, 2)


def idp_a(**overrides: Any) -> IdentityProviderPolicy:
    fields: dict[str, Any] = {
        "name": "idp-a",
        "issuer": ISSUER,
        "jwks": {
            "keys": [
                jwk(RSA, "k1", use="sig"),
                jwk(EC, "k2", alg="ES256"),
                jwk(ED, "k3"),
                jwk(rsa_key(1024), "small"),
                {"kty": "oct", "k": "c2VjcmV0", "kid": "sym"},
            ]
        },
        "audiences": ["agents-api"],
        "algorithms": ["RS256", "PS256", "ES256", "EdDSA"],
    }
    fields.update(overrides)
    return IdentityProviderPolicy(**fields)


def apply_twin(idps: IdentityProviders, kid: str) -> None:
    """Add idp-twin: idp-a's issuer, another key (``OTHER``, named ``kid``)."""
    twin = IdentityProviderPolicy(
        name="idp-twin", issuer=ISSUER, jwks={"keys": [jwk(OTHER, kid)]}
    )
    idps.apply("idp-twin", twin)


def idp_b() -> IdentityProviderPolicy:
    return IdentityProviderPolicy(
        name="idp-b", issuer=OTHER_ISSUER, jwks={"keys": [jwk(OTHER, "b1")]}
    )


@pytest.fixture
def idps() -> Iterator[IdentityProviders]:
    providers = IdentityProviders()
    providers.apply("idp-a", idp_a())
    providers.apply("idp-b", idp_b())
    yield providers


def oauth(**overrides: Any) -> OAuthSettings:
    fields: dict[str, Any] = {"identity_providers": ["idp-a", "idp-b"]}
    fields.update(overrides)
    return OAuthSettings(**fields)


def headers(*values: str, name: str = "Authorization") -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict([(name, v) for v in values]))


async def refused(auth: OAuthAuthenticator, *values: str) -> AuthFailure:
    with pytest.raises(AuthFailure) as info:
        await auth.authenticate(headers(*values))
    return info.value


def challenge(description: str) -> str:
    return f'{REALM}, error="invalid_token", error_description="{description}"'


async def cached(auth: OAuthAuthenticator, idps: IdentityProviders, token: str) -> None:
    """Authenticate ``token`` until the cache keeps it, then once from the cache.

    The cache keeps a token on its second verification; the third request
    must be a hit, so that a test voiding the entry after this has one.
    """
    before = len(idps.cache)
    await auth.authenticate(headers(token))
    assert len(idps.cache) == before
    await auth.authenticate(headers(token))
    assert len(idps.cache) == before + 1
    hits = oauth_module._CACHE_HIT.count
    await auth.authenticate(headers(token))
    assert oauth_module._CACHE_HIT.count == hits + 1


# --- success ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("private", "alg", "kid"),
    [
        (RSA, "RS256", "k1"),
        (RSA, "PS256", "k1"),
        (EC, "ES256", "k2"),
        (ED, "EdDSA", "k3"),
        (RSA, "RS256", None),
        (EC, "ES256", None),
    ],
)
async def test_authenticate_accepts_valid_token(
    idps: IdentityProviders, private: Any, alg: str, kid: str | None
) -> None:
    auth = OAuthAuthenticator(oauth(), idps)
    identity = await auth.authenticate(headers("Bearer " + sign(private, alg, kid)))
    assert identity.headers == (
        ("X-Auth-Subject", "client-1"),
        ("X-Auth-Issuer", ISSUER),
        ("X-Auth-Identity-Provider", "idp-a"),
    )


async def test_authenticate_other_idp_of_the_route(idps: IdentityProviders) -> None:
    token = sign(OTHER, "RS256", "b1", payload=claims(iss=OTHER_ISSUER))
    identity = await OAuthAuthenticator(oauth(), idps).authenticate(
        headers("Bearer " + token)
    )
    assert identity.headers[2] == ("X-Auth-Identity-Provider", "idp-b")


async def test_authenticate_without_subject_sets_no_subject(
    idps: IdentityProviders,
) -> None:
    token = sign(RSA, payload=claims(sub=...))
    identity = await OAuthAuthenticator(oauth(), idps).authenticate(
        headers("Bearer " + token)
    )
    assert identity.headers == (
        ("X-Auth-Issuer", ISSUER),
        ("X-Auth-Identity-Provider", "idp-a"),
    )


def test_authenticator_strip_sets(idps: IdentityProviders) -> None:
    assert OAuthAuthenticator(oauth(), idps).strip == IDENTITY_HEADERS
    hidden = OAuthAuthenticator(oauth(forward_token=False, header_name="X-Token"), idps)
    assert hidden.strip == IDENTITY_HEADERS | {"x-token"}


# --- header forms ---------------------------------------------------------------


MISSING = (
    401,
    "unauthorized",
    "Bearer token required",
    {"WWW-Authenticate": REALM},
)


async def test_authenticate_missing_token(idps: IdentityProviders) -> None:
    failure = await refused(OAuthAuthenticator(oauth(), idps))
    assert (failure.status, failure.error, failure.message, failure.headers) == (
        MISSING
    )


# "Bearer " reaches the gateway as "Bearer": HTTP parsers cut trailing space.
@pytest.mark.parametrize("value", ["", "Bearer", "bearer", "BEARER", "Bearer \t "])
async def test_authenticate_empty_token_is_missing(
    idps: IdentityProviders, value: str
) -> None:
    failure = await refused(OAuthAuthenticator(oauth(), idps), value)
    assert (failure.status, failure.error, failure.message, failure.headers) == (
        MISSING
    )


async def test_authenticate_two_headers_is_400(idps: IdentityProviders) -> None:
    token = "Bearer " + sign(RSA)
    failure = await refused(OAuthAuthenticator(oauth(), idps), token, token)
    assert (failure.status, failure.error) == (400, "invalid_request")
    assert failure.message == "Malformed request: more than one Authorization header"
    assert failure.headers == {
        "WWW-Authenticate": f'{REALM}, error="invalid_request", '
        'error_description="more than one Authorization header"'
    }


@pytest.mark.parametrize("value", ["bearer {t}", "BEARER\t\t{t}", "Bearer   {t}  "])
async def test_authenticate_prefix_forms(idps: IdentityProviders, value: str) -> None:
    auth = OAuthAuthenticator(oauth(), idps)
    identity = await auth.authenticate(headers(value.format(t=sign(RSA))))
    assert identity.headers[0] == ("X-Auth-Subject", "client-1")


async def test_authenticate_custom_header_and_empty_prefix(
    idps: IdentityProviders,
) -> None:
    auth = OAuthAuthenticator(oauth(header_name="X-Token", auth_header_prefix=""), idps)
    identity = await auth.authenticate(headers(sign(RSA), name="x-token"))
    assert identity.headers[0] == ("X-Auth-Subject", "client-1")
    failure = await refused(auth, "Bearer " + sign(RSA))
    assert failure.status == 401  # the Authorization header is not this route's


@pytest.mark.parametrize("scheme", ["Basic", "Bearerx", "DPoP", "Token"])
async def test_authenticate_other_scheme_is_missing(
    idps: IdentityProviders, scheme: str
) -> None:
    failure = await refused(OAuthAuthenticator(oauth(), idps), f"{scheme} {sign(RSA)}")
    assert (failure.status, failure.error, failure.message, failure.headers) == (
        MISSING
    )


# --- hostile tokens -------------------------------------------------------------


def _x5c(private: Any) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attacker")])
    now = __import__("datetime").datetime.now(__import__("datetime").timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now.replace(year=now.year + 1))
        .sign(private, hashes.SHA256())
    )
    import base64

    from cryptography.hazmat.primitives.serialization import Encoding

    return base64.b64encode(cert.public_bytes(Encoding.DER)).decode()


def _hostile() -> list[tuple[str, str, str]]:
    pub_jwk = json.dumps(jwk(RSA, "k1")).encode()
    now = int(time.time())
    nonstr = compact(
        {"alg": "RS256", "kid": "k1"}, f'{{"iss":"{ISSUER}","exp":NaN}}', b"x"
    )
    return [
        (
            "alg none",
            compact({"alg": "none", "typ": "JWT"}, claims(), b""),
            "token algorithm not accepted",
        ),
        (
            "alg None no sig",
            compact({"alg": "None"}, claims(), b""),
            "token algorithm not accepted",
        ),
        (
            "HS256 with PEM public key",
            hmac_token(pem(RSA)),
            "token algorithm not accepted",
        ),
        (
            "HS512 with JWK public key",
            hmac_token(pub_jwk, "HS512"),
            "token algorithm not accepted",
        ),
        ("DER ECDSA", sign(EC, "ES256", "k2", der=True), "invalid signature"),
        (
            "JWE",
            "eyJhbGciOiJSU0EtT0FFUCJ9.a.b.c.d",
            "encrypted tokens (JWE) are not accepted",
        ),
        (
            "JSON serialization",
            json.dumps({"payload": b64(claims()), "signatures": []}),
            "JWS JSON serialization is not accepted",
        ),
        (
            "embedded jwk, known kid",
            sign(ATTACKER, jwk=jwk(ATTACKER)),
            "invalid signature",
        ),
        (
            "embedded jwk, own kid",
            sign(ATTACKER, kid="evil", jwk=jwk(ATTACKER, "evil")),
            "unknown key for the token's algorithm",
        ),
        ("jku", sign(ATTACKER, jku="https://evil.test/jwks"), "invalid signature"),
        ("x5u", sign(ATTACKER, x5u="https://evil.test/cert"), "invalid signature"),
        ("x5c", sign(ATTACKER, x5c=[_x5c(ATTACKER)]), "invalid signature"),
        (
            "x5c no kid",
            sign(ATTACKER, kid=None, x5c=[_x5c(ATTACKER)]),
            "invalid signature",
        ),
        (
            "unknown crit",
            sign(RSA, crit=["exp"], exp=1),
            "unknown critical header parameter",
        ),
        ("typ JOSE+JSON", sign(RSA, typ="JOSE+JSON"), "token type is not JWT"),
        ("typ dpop", sign(RSA, typ="dpop+jwt"), "token type is not JWT"),
        (
            "A's key, B's issuer",
            sign(RSA, kid="b1", payload=claims(iss=OTHER_ISSUER)),
            "invalid signature",
        ),
        (
            "A's key and kid, B's issuer",
            sign(RSA, payload=claims(iss=OTHER_ISSUER)),
            "unknown key for the token's algorithm",
        ),
        (
            "unknown issuer",
            sign(RSA, payload=claims(iss="https://evil.test")),
            "token issuer not accepted",
        ),
        (
            "issuer trailing slash",
            sign(RSA, payload=claims(iss=ISSUER + "/")),
            "token issuer not accepted",
        ),
        ("no issuer", sign(RSA, payload=claims(iss=...)), "token has no issuer"),
        (
            "subject with a leading space",
            sign(RSA, payload=claims(sub=" admin")),
            "token subject has leading or trailing whitespace",
        ),
        (
            "exp string",
            sign(RSA, payload=claims(exp="1900000000")),
            "token exp is not a number",
        ),
        ("exp true", sign(RSA, payload=claims(exp=True)), "token exp is not a number"),
        ("exp NaN", nonstr, "token payload is not JSON"),
        ("exp missing", sign(RSA, payload=claims(exp=...)), "token has no expiry"),
        ("expired", sign(RSA, payload=claims(exp=now - 31)), "token expired"),
        (
            "nbf future",
            sign(RSA, payload=claims(nbf=now + 86400)),
            "token not yet valid",
        ),
        (
            "iat future",
            sign(RSA, payload=claims(iat=now + 86400)),
            "token issued in the future",
        ),
        ("nbf string", sign(RSA, payload=claims(nbf="0")), "token nbf is not a number"),
        (
            "wrong audience",
            sign(RSA, payload=claims(aud="other")),
            "token audience not accepted",
        ),
        ("no audience", sign(RSA, payload=claims(aud=...)), "token has no audience"),
        (
            "audience not strings",
            sign(RSA, payload=claims(aud=[1])),
            "token audience not accepted",
        ),
        (
            "alg not allowed for IdP",
            sign(RSA, "RS512"),
            "token algorithm not allowed for issuer",
        ),
        (
            "RS256 by EC kid",
            sign(RSA, "RS256", "k2"),
            "unknown key for the token's algorithm",
        ),
        (
            "ES256 on RSA kid",
            sign(EC, "ES256", "k1"),
            "unknown key for the token's algorithm",
        ),
        (
            "PS256 on ES256-only JWK",
            sign(RSA, "PS256", "k2"),
            "unknown key for the token's algorithm",
        ),
        (
            "RSA 1024 key",
            sign(rsa_key(1024), kid="small"),
            "unknown key for the token's algorithm",
        ),
        (
            "symmetric JWK kid",
            sign(RSA, kid="sym"),
            "unknown key for the token's algorithm",
        ),
        (
            "bad base64 header",
            "e30=." + b64(claims()) + ".",
            "token header is not base64url",
        ),
        ("bad base64 sig", sign(RSA) + "*", "token signature is not base64url"),
        (
            "non-JSON payload",
            f"{b64({'alg': 'RS256'})}.{b64('x')}.",
            "token payload is not JSON",
        ),
        ("long", sign(RSA, payload=claims(pad="x" * 20000)), "token too long"),
        ("empty parts", "..", "token header is not JSON"),
        ("tampered payload", _tampered(), "invalid signature"),
    ]


def _tampered() -> str:
    head, _, sig = sign(RSA).split(".")
    return f"{head}.{b64(claims(sub='admin'))}.{sig}"


HOSTILE = _hostile()


@pytest.mark.parametrize(
    ("case", "token", "description"), HOSTILE, ids=[h[0] for h in HOSTILE]
)
async def test_authenticate_rejects_hostile_token(
    idps: IdentityProviders, case: str, token: str, description: str
) -> None:
    failure = await refused(OAuthAuthenticator(oauth(), idps), "Bearer " + token)
    assert (failure.status, failure.error) == (401, "invalid_token")
    assert failure.message == f"Invalid bearer token: {description}"
    assert failure.headers == {"WWW-Authenticate": challenge(description)}
    assert token not in failure.message


async def test_authenticate_deployment_audiences_replace_idp_audiences(
    idps: IdentityProviders,
) -> None:
    auth = OAuthAuthenticator(oauth(audiences=["chat"]), idps)
    identity = await auth.authenticate(
        headers("Bearer " + sign(RSA, payload=claims(aud="chat")))
    )
    assert identity.headers[2] == ("X-Auth-Identity-Provider", "idp-a")
    failure = await refused(auth, "Bearer " + sign(RSA))
    assert failure.headers == {
        "WWW-Authenticate": challenge("token audience not accepted")
    }


async def test_authenticate_no_audiences_anywhere_accepts_any(
    idps: IdentityProviders,
) -> None:
    token = sign(OTHER, "RS256", "b1", payload=claims(iss=OTHER_ISSUER, aud="whatever"))
    identity = await OAuthAuthenticator(oauth(), idps).authenticate(
        headers("Bearer " + token)
    )
    assert identity.headers[2] == ("X-Auth-Identity-Provider", "idp-b")


async def test_authenticate_only_selected_idps(idps: IdentityProviders) -> None:
    auth = OAuthAuthenticator(oauth(identity_providers=["idp-b"]), idps)
    failure = await refused(auth, "Bearer " + sign(RSA))
    assert failure.headers == {
        "WWW-Authenticate": challenge("token issuer not accepted")
    }


async def test_authenticate_two_idps_of_one_issuer_first_named_wins(
    idps: IdentityProviders,
) -> None:
    apply_twin(idps, "t1")
    auth = OAuthAuthenticator(oauth(identity_providers=["idp-a", "idp-twin"]), idps)
    identity = await auth.authenticate(headers("Bearer " + sign(RSA)))
    assert identity.headers[2] == ("X-Auth-Identity-Provider", "idp-a")
    failure = await refused(auth, "Bearer " + sign(OTHER, kid="t1"))
    assert failure.headers == {
        "WWW-Authenticate": challenge("unknown key for the token's algorithm")
    }


async def test_authenticate_token_without_kid_tries_every_fitting_key(
    idps: IdentityProviders, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = [ec_key("P-256", n) for n in range(10, 20)]
    idps.apply("idp-a", idp_a(jwks={"keys": [jwk(k) for k in keys]}))
    tried: list[object] = []

    def counting(alg: str, key: VerificationKey, data: bytes, sig: bytes) -> bool:
        tried.append(key)
        return verify_signature(alg, key, data, sig)

    monkeypatch.setattr("gateway.oauth.verify_signature", counting)
    auth = OAuthAuthenticator(oauth(), idps)
    identity = await auth.authenticate(
        headers("Bearer " + sign(keys[9], "ES256", None))
    )
    assert identity.headers[2] == ("X-Auth-Identity-Provider", "idp-a")
    assert len(tried) == 10
    tried.clear()

    forged = sign(ec_key("P-256", 99), "ES256", None)
    failure = await refused(auth, "Bearer " + forged)
    assert failure.headers == {"WWW-Authenticate": challenge("invalid signature")}
    assert len(tried) == 10


# --- identity provider updates --------------------------------------------------

_ODD_JWKS = [
    jwk(rsa_key(2048, 3), "odd", alg=["RS256"]),
    jwk(rsa_key(2048, 3), "odd", alg={"name": "RS256"}),
    jwk(rsa_key(2048, 3), "odd", x_created=10**30),
]


@pytest.mark.parametrize("odd", _ODD_JWKS, ids=["alg list", "alg object", "bigint"])
async def test_apply_update_with_odd_jwk_revokes_the_old_keys(
    idps: IdentityProviders, odd: dict[str, Any]
) -> None:
    auth = OAuthAuthenticator(oauth(), idps)
    revoked = "Bearer " + sign(RSA)
    await auth.authenticate(headers(revoked))

    idps.apply("idp-a", idp_a(jwks={"keys": [jwk(EC, "k2"), odd]}))

    failure = await refused(auth, revoked)
    assert failure.headers == {
        "WWW-Authenticate": challenge("unknown key for the token's algorithm")
    }
    identity = await auth.authenticate(headers("Bearer " + sign(EC, "ES256", "k2")))
    assert identity.headers[2] == ("X-Auth-Identity-Provider", "idp-a")


async def test_apply_update_that_cannot_be_built_fails_closed(
    idps: IdentityProviders, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth = OAuthAuthenticator(oauth(), idps)
    token = "Bearer " + sign(RSA)
    await auth.authenticate(headers(token))

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("cannot build")

    monkeypatch.setattr("gateway.oauth.Keyring", broken)
    idps.apply("idp-a", idp_a(jwks={"keys": [jwk(EC, "k2")]}))

    assert idps.get("idp-a") is None
    failure = await refused(auth, token)
    assert failure.headers == {
        "WWW-Authenticate": challenge("token issuer not accepted")
    }


# --- verified-token cache -------------------------------------------------------


async def test_cache_reuses_verdict_and_rechecks_audience(
    idps: IdentityProviders,
) -> None:
    token = "Bearer " + sign(RSA)
    await cached(OAuthAuthenticator(oauth(), idps), idps, token)
    await OAuthAuthenticator(oauth(), idps).authenticate(headers(token))
    assert len(idps.cache) == 1
    failure = await refused(OAuthAuthenticator(oauth(audiences=["chat"]), idps), token)
    assert failure.headers == {
        "WWW-Authenticate": challenge("token audience not accepted")
    }


async def test_cache_voided_when_key_removed(idps: IdentityProviders) -> None:
    token = "Bearer " + sign(RSA)
    auth = OAuthAuthenticator(oauth(), idps)
    await cached(auth, idps, token)
    idps.apply("idp-a", idp_a(jwks={"keys": [jwk(EC, "k2")]}))
    failure = await refused(auth, token)
    assert failure.headers == {
        "WWW-Authenticate": challenge("unknown key for the token's algorithm")
    }


async def test_cache_voided_when_idp_policy_changes(idps: IdentityProviders) -> None:
    token = "Bearer " + sign(RSA)
    auth = OAuthAuthenticator(oauth(), idps)
    await cached(auth, idps, token)
    idps.apply("idp-a", idp_a(algorithms=["ES256"]))
    failure = await refused(auth, token)
    assert failure.headers == {
        "WWW-Authenticate": challenge("token algorithm not allowed for issuer")
    }


async def test_cache_voided_when_idp_removed(idps: IdentityProviders) -> None:
    token = "Bearer " + sign(RSA)
    auth = OAuthAuthenticator(oauth(), idps)
    await cached(auth, idps, token)
    idps.apply("idp-a", None)
    failure = await refused(auth, token)
    assert failure.headers == {
        "WWW-Authenticate": challenge("token issuer not accepted")
    }


async def test_cache_rechecks_expiry(idps: IdentityProviders) -> None:
    idps.apply("idp-a", idp_a(clock_skew_s=0))
    token = "Bearer " + sign(RSA, payload=claims(exp=time.time() + 0.3))
    auth = OAuthAuthenticator(oauth(), idps)
    await cached(auth, idps, token)
    await asyncio.sleep(0.4)
    failure = await refused(auth, token)
    assert failure.headers == {"WWW-Authenticate": challenge("token expired")}


async def test_cache_keeps_the_skew_of_expiry(idps: IdentityProviders) -> None:
    idps.apply("idp-a", idp_a(clock_skew_s=0.4))
    token = "Bearer " + sign(RSA, payload=claims(exp=time.time() + 0.2))
    auth = OAuthAuthenticator(oauth(), idps)
    await cached(auth, idps, token)

    await asyncio.sleep(0.3)  # expired, but within the skew
    assert (await auth.authenticate(headers(token))).headers[0][0] == "X-Auth-Subject"
    await asyncio.sleep(0.4)
    failure = await refused(auth, token)
    assert failure.headers == {"WWW-Authenticate": challenge("token expired")}


async def test_cache_hit_without_audience_refused_where_one_is_required(
    idps: IdentityProviders,
) -> None:
    idps.apply("idp-a", idp_a(audiences=[]))
    token = "Bearer " + sign(RSA, payload=claims(aud=...))
    await cached(OAuthAuthenticator(oauth(), idps), idps, token)

    strict = OAuthAuthenticator(oauth(audiences=["chat"]), idps)
    failure = await refused(strict, token)
    assert failure.headers == {"WWW-Authenticate": challenge("token has no audience")}


async def test_cache_hit_not_shared_with_another_idp_of_the_same_issuer(
    idps: IdentityProviders,
) -> None:
    # One cache serves every deployment: a token verified for idp-a is not
    # verified for a deployment that trusts idp-twin, which has that issuer
    # but other keys.
    apply_twin(idps, "k1")
    token = "Bearer " + sign(RSA)
    await cached(OAuthAuthenticator(oauth(), idps), idps, token)

    failure = await refused(
        OAuthAuthenticator(oauth(identity_providers=["idp-twin"]), idps), token
    )
    assert failure.headers == {"WWW-Authenticate": challenge("invalid signature")}
    assert len(idps.cache) == 0


_T = float(int(time.time()))


# A verified token's window on a hit is its latest nbf or iat less the skew
# (30 s): a clock stepped back before it refuses the token as a miss would.
@pytest.mark.parametrize(
    ("nbf", "iat", "description"),
    [
        (_T + 20, ..., "token not yet valid"),
        (..., _T + 20, "token issued in the future"),
        (_T + 5, _T + 20, "token issued in the future"),
        (_T + 20, _T + 5, "token not yet valid"),
    ],
)
async def test_cache_hit_rechecks_not_before_when_the_clock_steps_back(
    idps: IdentityProviders,
    monkeypatch: pytest.MonkeyPatch,
    nbf: object,
    iat: object,
    description: str,
) -> None:
    clock = [_T]
    monkeypatch.setattr("gateway.oauth.time.time", lambda: clock[0])
    token = "Bearer " + sign(RSA, payload=claims(nbf=nbf, iat=iat, exp=_T + 600))
    auth = OAuthAuthenticator(oauth(), idps)
    await cached(auth, idps, token)

    clock[0] = _T - 9.5  # within the skew of both: still a hit
    assert (await auth.authenticate(headers(token))).headers[0][0] == "X-Auth-Subject"
    clock[0] = _T - 15
    failure = await refused(auth, token)
    assert failure.headers == {"WWW-Authenticate": challenge(description)}
    assert len(idps.cache) == 1


@pytest.mark.parametrize("sub", ["client-1", ...])
async def test_cache_identity_of_an_issuer_unfit_for_a_header_line_has_no_lines(
    idps: IdentityProviders, sub: object
) -> None:
    # The proxy refuses an identity without lines rather than forge headers.
    issuer = "https://idp.test\r\nX-Auth-Subject: admin"
    idps.apply("idp-a", idp_a(issuer=issuer))
    token = "Bearer " + sign(RSA, payload=claims(iss=issuer, sub=sub))
    auth = OAuthAuthenticator(oauth(), idps)
    for _ in range(3):  # a miss, a miss that is kept, then a hit
        identity = await auth.authenticate(headers(token))
        assert identity.headers[-2:] == (
            ("X-Auth-Issuer", issuer),
            ("X-Auth-Identity-Provider", "idp-a"),
        )
        assert identity.lines is None


async def test_cache_keeps_a_token_on_its_second_verification(
    idps: IdentityProviders, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A token sent once is never stored: it would push out one in use.
    calls = []
    real = verify_signature

    def counting(*args: Any) -> bool:
        calls.append(args[0])
        return real(*args)

    monkeypatch.setattr("gateway.oauth.verify_signature", counting)
    token = "Bearer " + sign(RSA)
    auth = OAuthAuthenticator(oauth(), idps)
    for _ in range(4):
        await auth.authenticate(headers(token))
    assert calls == ["RS256", "RS256"]
    assert len(idps.cache) == 1


async def test_cache_never_keeps_tokens_sent_once(idps: IdentityProviders) -> None:
    auth = OAuthAuthenticator(oauth(), idps)
    for i in range(5):
        token = "Bearer " + sign(RSA, payload=claims(sub=f"client-{i}"))
        identity = await auth.authenticate(headers(token))
        assert identity.headers[0] == ("X-Auth-Subject", f"client-{i}")
    assert len(idps.cache) == 0


class _Entry:
    """Stands in for a Verified in the cache's own tests: it holds a token."""

    __slots__ = ("token",)

    def __init__(self) -> None:
        self.token = ""


def test_cache_remembers_at_most_max_entries_tokens_seen_once() -> None:
    from gateway.oauth import TokenCache

    cache = TokenCache(max_entries=3)
    verified = _Entry()
    for i in range(3):
        cache.admit(f"t{i}", verified)  # type: ignore[arg-type]
    assert len(cache) == 0 and len(cache._seen) == 3
    cache.admit("t3", verified)  # type: ignore[arg-type]  # memory starts over
    assert cache._seen == {hash("t3")}
    cache.admit("t0", verified)  # type: ignore[arg-type]  # forgotten: seen once
    cache.admit("t3", verified)  # type: ignore[arg-type]
    assert len(cache) == 1 and cache.get("t3") is verified
    assert cache.get("t0") is None


def test_cache_bounded_in_entries() -> None:
    from gateway.oauth import TokenCache

    cache = TokenCache(max_entries=3)
    for i in range(5):
        cache.put(f"t{i}", _Entry())  # type: ignore[arg-type]
    assert len(cache) == 3
    assert cache.get("t0") is None and cache.get("t4") is not None


def test_cache_evicts_oldest_first_and_keeps_its_byte_count() -> None:
    from gateway.oauth import TokenCache

    cache = TokenCache(max_entries=3)
    for i in range(1000):
        cache.put(f"t{i:04d}", _Entry())  # type: ignore[arg-type]
    cache.put("t0998", _Entry())  # type: ignore[arg-type]  # already in: kept

    assert [cache.get(f"t{i:04d}") is not None for i in range(996, 1000)] == [
        False,
        True,
        True,
        True,
    ]
    cache.discard("t0999")
    cache.discard("t0999")
    assert len(cache) == 2
    assert cache._bytes == 2 * (5 + TokenCache.ENTRY_OVERHEAD)


def test_cache_bounded_in_bytes() -> None:
    from gateway.oauth import TokenCache

    cache = TokenCache(
        max_entries=100, max_bytes=3 * (1000 + TokenCache.ENTRY_OVERHEAD)
    )
    for i in range(5):
        cache.put(str(i) * 1000, _Entry())  # type: ignore[arg-type]
    assert len(cache) == 3


def test_cache_entry_counts_only_for_its_whole_token() -> None:
    from gateway.oauth import TAIL, TokenCache

    cache = TokenCache()
    tail = "s" * TAIL
    first, second = _Entry(), _Entry()
    cache.put("a.b." + tail, first)  # type: ignore[arg-type]
    assert cache.get("a.b." + tail) is first
    assert cache.get("a.c." + tail) is None  # the same tail, another token
    assert cache.get(tail) is None
    cache.put("a.c." + tail, second)  # type: ignore[arg-type]  # not kept
    assert cache.get("a.c." + tail) is None and second.token == ""
    cache.discard("a.c." + tail)  # not the entry's token: nothing goes
    assert len(cache) == 1 and cache.get("a.b." + tail) is first
    cache.discard("a.b." + tail)
    assert len(cache) == 0 and cache._bytes == 0


def _forged(token: str, sub: str) -> str:
    """``token`` with its signature on another payload."""
    head, _, signature = token.split(".")
    return ".".join([head, b64(claims(sub=sub)), signature])


def _case_twin(token: str) -> str:
    """``token`` with the letters of its header swapped to the other case."""
    head, payload, signature = token.split(".")
    return ".".join([head.swapcase(), payload, signature])


async def test_cache_hit_needs_the_whole_token(idps: IdentityProviders) -> None:
    auth = OAuthAuthenticator(oauth(), idps)
    token = sign(RSA)
    await cached(auth, idps, "Bearer " + token)
    same_length = _forged(token, "admin-01")  # claims() signs "client-1"
    assert len(same_length) == len(token)
    hits = oauth_module._CACHE_HIT.count
    for value in (
        "Bearer " + same_length,  # the cached signature, another payload
        "Bearer " + _forged(token, "admin"),
        "Bearer " + _case_twin(token),
        # The same through the general rule (another case, more spaces).
        "bearer " + _case_twin(token),
        "Bearer  " + same_length,
        "Bearer x" + token,  # the cached token with a character before it
        "Bearer " + token[:-1] + ("A" if token[-1] != "A" else "B"),
    ):
        failure = await refused(auth, value)
        assert (failure.status, failure.error) == (401, "invalid_token")
    assert oauth_module._CACHE_HIT.count == hits
    assert len(idps.cache) == 1


@pytest.mark.parametrize("scheme", ["Xearer", "Bearer\x00", "Beare"])
async def test_cache_hit_needs_the_prefix(idps: IdentityProviders, scheme: str) -> None:
    auth = OAuthAuthenticator(oauth(), idps)
    token = sign(RSA)
    await cached(auth, idps, "Bearer " + token)
    hits = oauth_module._CACHE_HIT.count
    failure = await refused(auth, f"{scheme} {token}")
    assert (failure.status, failure.error, failure.message, failure.headers) == (
        MISSING
    )
    assert oauth_module._CACHE_HIT.count == hits


async def test_cache_hit_through_the_general_rule(idps: IdentityProviders) -> None:
    auth = OAuthAuthenticator(oauth(), idps)
    token = sign(RSA)
    await cached(auth, idps, "Bearer " + token)
    for value in ("bearer " + token, "Bearer  " + token, f"Bearer {token} \t"):
        hits = oauth_module._CACHE_HIT.count
        identity = await auth.authenticate(headers(value))
        assert identity.headers[0] == ("X-Auth-Subject", "client-1")
        assert oauth_module._CACHE_HIT.count == hits + 1


async def test_cache_hit_read_by_each_route_s_own_prefix(
    idps: IdentityProviders,
) -> None:
    bearer = OAuthAuthenticator(oauth(), idps)
    bare = OAuthAuthenticator(oauth(auth_header_prefix=""), idps)
    other = OAuthAuthenticator(oauth(auth_header_prefix="Token"), idps)
    token = sign(RSA)
    await cached(bearer, idps, "Bearer " + token)
    hits = oauth_module._CACHE_HIT.count
    failure = await refused(bare, "Bearer " + token)  # not a token without a prefix
    assert (failure.status, failure.error) == (401, "invalid_token")
    failure = await refused(other, "Bearer " + token)
    assert (failure.status, failure.error, failure.message, failure.headers) == (
        MISSING
    )
    assert oauth_module._CACHE_HIT.count == hits
    for auth, value in ((bare, token), (other, "Token " + token)):
        identity = await auth.authenticate(headers(value))
        assert identity.headers[0] == ("X-Auth-Subject", "client-1")
    assert oauth_module._CACHE_HIT.count == hits + 2


# --- property: never anything but AuthFailure 400/401/503 ----------------------

_JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
_HEADER_OBJ = st.fixed_dictionaries(
    {
        "alg": st.sampled_from(["RS256", "ES256", "EdDSA", "none", "HS256", "PS512"])
        | st.text()
    },
    optional={
        "kid": st.sampled_from(["k1", "k2", "k3", "small", "sym"]) | _JSONISH,
        "typ": st.sampled_from(["JWT", "at+jwt"]) | _JSONISH,
        "crit": _JSONISH,
    },
)
_CLAIMS_OBJ = st.fixed_dictionaries(
    {},
    optional={
        "iss": st.sampled_from([ISSUER, OTHER_ISSUER]) | _JSONISH,
        "exp": _JSONISH,
        "nbf": _JSONISH,
        "iat": _JSONISH,
        "aud": _JSONISH,
        "sub": _JSONISH,
    },
)
_STRUCTURED = st.builds(
    lambda h, c, s: f"Bearer {b64(json.dumps(h))}.{b64(json.dumps(c))}.{b64(s)}",
    _HEADER_OBJ,
    _CLAIMS_OBJ,
    st.binary(max_size=300),
)
_VALUES = st.lists(
    st.text(max_size=200) | _STRUCTURED | st.just("Bearer " + sign(RSA)), max_size=3
)


def _answer_texts() -> str:
    """Every string constant of the modules that word an authentication answer.

    Hypothesis draws text from the constants of the code under test too: a
    piece of a fixed answer ("invalid_r") is in the answer without having
    been echoed.
    """
    texts = []
    for module in (oauth_module, tokens_module, auth_module):
        tree = ast.parse(Path(module.__file__).read_text())
        texts += [
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        ]
    return "\n".join(texts)


_ANSWER_TEXTS = _answer_texts()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=_VALUES)
@example(values=["", "invalid_r"])  # a piece of "invalid_request", not an echo
def test_authenticate_property_only_auth_failures(values: list[str]) -> None:
    async def run() -> None:
        idps = IdentityProviders()
        idps.apply("idp-a", idp_a())
        idps.apply("idp-b", idp_b())
        try:
            await OAuthAuthenticator(oauth(), idps).authenticate(headers(*values))
        except AuthFailure as failure:
            assert failure.status in (400, 401, 503)
            for value in values:
                if len(value) > 8 and value not in _ANSWER_TEXTS:
                    assert value not in failure.message
                    assert all(value not in h for h in failure.headers.values())

    asyncio.run(run())


# Each claim is often valid, so that tokens get past one check to the next,
# and otherwise any JSON value (integers beyond 64 bits included).
_NOW = int(time.time())
_TIME = st.integers(_NOW - 100, _NOW + 1000) | _JSONISH
_SIGNED_CLAIMS = st.fixed_dictionaries(
    {
        "iss": st.just(ISSUER),
        "exp": _TIME | st.integers(),
        "aud": st.sampled_from(["agents-api", ["x", "agents-api"]]) | _JSONISH,
    },
    optional={"nbf": _TIME, "iat": _TIME, "sub": st.text(max_size=20) | _JSONISH},
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=_SIGNED_CLAIMS)
def test_authenticate_property_signed_tokens_with_any_claims(
    payload: dict[str, Any],
) -> None:
    token = "Bearer " + sign(RSA, payload=payload)

    async def run() -> None:
        idps = IdentityProviders()
        idps.apply("idp-a", idp_a())
        try:
            identity = await OAuthAuthenticator(oauth(), idps).authenticate(
                headers(token)
            )
        except AuthFailure as failure:
            assert (failure.status, failure.error) == (401, "invalid_token")
            return
        # What the proxy puts on header lines must be able to go there as is.
        assert identity.headers[-1] == ("X-Auth-Identity-Provider", "idp-a")
        assert identity.lines == "".join(f"{n}: {v}\r\n" for n, v in identity.headers)
        for _, value in identity.headers:
            assert value == value.strip() and not {"\r", "\n", "\0"} & set(value)
            value.encode("utf-8", "surrogateescape")

    asyncio.run(run())


_VALID = sign(RSA)
_BLANKS = st.sampled_from(["", " ", "  ", "\t", " \t "])
_SCHEMES = st.sampled_from(["Bearer", "bearer", "BEARER", "Bearer:", "Bearerx", ""])
_FRAMED = st.builds(
    lambda a, scheme, b, c: f"{a}{scheme}{b}{_VALID}{c}",
    _BLANKS,
    _SCHEMES,
    _BLANKS,
    _BLANKS,
)


@settings(max_examples=300, deadline=None)
@given(value=_FRAMED, prefix=st.sampled_from(["Bearer", "bearer ", ""]))
def test_authenticate_property_token_is_read_as_the_general_rule_reads_it(
    value: str, prefix: str
) -> None:
    # The hot path reads the usual "Bearer <token>" without the general rule;
    # for every framing, the outcome must be the general rule's.
    expected = extract_token([value], prefix.strip().lower()) == _VALID

    async def run() -> bool:
        idps = IdentityProviders()
        idps.apply("idp-a", idp_a())
        auth = OAuthAuthenticator(oauth(auth_header_prefix=prefix), idps)
        try:
            await auth.authenticate(headers(value))
        except AuthFailure:
            return False
        return True

    assert asyncio.run(run()) is expected


# "İ" is the one character whose lower case is longer ("i" and a combining
# dot): a configured prefix holding it is where the inline reading and the
# general rule could part ways.
@pytest.mark.parametrize(
    "value", ["İD {t}", "İD  {t}", "İD\t{t}", "i\u0307d {t}", "İd {t}", "Bearer {t}"]
)
async def test_authenticate_prefix_longer_in_lower_case_read_as_the_general_rule(
    idps: IdentityProviders, value: str
) -> None:
    value = value.format(t=_VALID)
    auth = OAuthAuthenticator(oauth(auth_header_prefix="İD"), idps)
    if extract_token([value], "İD".lower()) == _VALID:
        identity = await auth.authenticate(headers(value))
        assert identity.headers[0] == ("X-Auth-Subject", "client-1")
    else:
        failure = await refused(auth, value)
        assert (failure.status, failure.error, failure.message, failure.headers) == (
            MISSING
        )


# --- diagnosis ------------------------------------------------------------------


async def test_diagnose_valid_token_lists_every_check(idps: IdentityProviders) -> None:
    token = sign(RSA)
    result = await diagnose(token, oauth(), idps)
    assert (result.valid, result.failed_check, result.reason) == (True, None, None)
    assert (result.identity_provider, result.subject) == ("idp-a", "client-1")
    assert [(c.name, c.ok) for c in result.checks] == [
        ("format", True),
        ("issuer", True),
        ("algorithm", True),
        ("key", True),
        ("signature", True),
        ("expiry", True),
        ("not_before", True),
        ("audience", True),
    ]
    assert result.checks[1].detail == "identity provider idp-a"
    assert token not in msgspec.json.encode(result).decode()


@pytest.mark.parametrize(
    ("case", "token", "description"), HOSTILE, ids=[h[0] for h in HOSTILE]
)
async def test_diagnose_names_the_failed_check(
    idps: IdentityProviders, case: str, token: str, description: str
) -> None:
    result = await diagnose(token, oauth(), idps)
    assert (result.valid, result.reason) == (False, description)
    assert result.checks[-1].name == result.failed_check
    assert result.checks[-1].ok is False
    assert all(c.ok for c in result.checks[:-1])
    assert token not in msgspec.json.encode(result).decode()


async def test_diagnose_expired_reports_idp(idps: IdentityProviders) -> None:
    token = sign(RSA, payload=claims(exp=int(time.time()) - 100))
    result = await diagnose(token, oauth(), idps)
    assert (result.failed_check, result.reason, result.identity_provider) == (
        "expiry",
        "token expired",
        "idp-a",
    )
    assert [c.name for c in result.checks] == [
        "format",
        "issuer",
        "algorithm",
        "key",
        "signature",
        "expiry",
    ]
