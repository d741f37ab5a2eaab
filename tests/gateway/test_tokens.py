"""Unit tests of gateway/tokens.py: every parsing and claim rule, hostile inputs."""

from __future__ import annotations

import base64
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given
from hypothesis import strategies as st

from gateway.jwks import parse_jwk
from gateway.tokens import (
    MAX_TOKEN_LENGTH,
    Claims,
    TokenError,
    b64url_decode,
    check_algorithm_allowed,
    check_algorithm_supported,
    check_audience,
    check_times,
    extract_token,
    parse_token,
    read_claims,
    read_issuer,
    verify_signature,
)
from tests.gateway.tokenkit import (
    b64,
    claims,
    compact,
    ec_key,
    ed_key,
    hmac_token,
    jwk,
    raw_sign,
    rsa_key,
    sign,
)

# --- extraction ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "prefix", "expected"),
    [
        ([], "bearer", None),
        (["Bearer abc"], "bearer", "abc"),
        (["bearer abc"], "bearer", "abc"),
        (["BEARER abc"], "bearer", "abc"),
        (["Bearer \t  abc"], "bearer", "abc"),
        (["Bearer\tabc"], "bearer", "abc"),
        (["Bearer abc  "], "bearer", "abc"),
        (["Bearer "], "bearer", None),
        (["Bearer"], "bearer", None),
        ([""], "bearer", None),
        (["Bearerabc"], "bearer", None),
        (["Basic abc"], "bearer", None),
        (["Token abc"], "token", "abc"),
        (["abc"], "", "abc"),
        (["  abc "], "", "abc"),
        (["Bearer abc"], "", "Bearer abc"),
        ([""], "", None),
    ],
)
def test_extract_token_header_forms(
    values: list[str], prefix: str, expected: str | None
) -> None:
    assert extract_token(values, prefix) == expected


def test_extract_token_two_headers_is_malformed_request() -> None:
    with pytest.raises(ValueError, match="more than one token header"):
        extract_token(["Bearer a", "Bearer b"], "bearer")


# --- base64url ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", b""), ("YQ", b"a"), ("YWI", b"ab"), ("YWJj", b"abc"), ("-_8", b"\xfb\xff")],
)
def test_b64url_decode_accepts_canonical(text: str, expected: bytes) -> None:
    assert b64url_decode(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "YQ==",
        "YWI=",
        "Y",
        "YWJjZ",
        "+/8",
        "YW Jj",
        "YWJj\n",
        "\tYWJj",
        "YW\x00j",
        "YR",
        "YWJ",
        "é",
        "YQ..",
        "YW+j",
        "YW/j",
        "YWJ=",
        "ＹＷＪｊ",
    ],
)
def test_b64url_decode_rejects_non_strict(text: str) -> None:
    with pytest.raises(ValueError):
        b64url_decode(text)


_B64_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_NEAR_B64 = st.one_of(
    st.sampled_from(_B64_CHARS),
    st.sampled_from("+/=. \t\n\x00é"),
    st.characters(codec="utf-8"),
)


@given(st.text(alphabet=_NEAR_B64, max_size=12))
def test_b64url_decode_only_inverts_the_canonical_encoding(text: str) -> None:
    try:
        decoded = b64url_decode(text)
    except ValueError:
        return
    assert base64.urlsafe_b64encode(decoded).rstrip(b"=").decode() == text


@given(st.binary(max_size=64))
def test_b64url_decode_reads_every_canonical_encoding(data: bytes) -> None:
    text = base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    assert b64url_decode(text) == data


# --- parsing ------------------------------------------------------------------

GOOD_HEADER = {"alg": "RS256", "typ": "JWT", "kid": "k1"}


def _parse_error(token: str) -> tuple[str, str]:
    with pytest.raises(TokenError) as info:
        parse_token(token)
    return info.value.check, info.value.description


@pytest.mark.parametrize(
    ("token", "check", "description"),
    [
        ("", "format", "token is not a JWS compact serialization"),
        ("abc", "format", "token is not a JWS compact serialization"),
        ("a.b", "format", "token is not a JWS compact serialization"),
        ("a.b.c.d", "format", "token is not a JWS compact serialization"),
        ("a.b.c.d.e", "format", "encrypted tokens (JWE) are not accepted"),
        (
            '{"payload":"x","signatures":[]}',
            "format",
            "JWS JSON serialization is not accepted",
        ),
        ("x" * (MAX_TOKEN_LENGTH + 1), "format", "token too long"),
        ("!!.e30.", "format", "token header is not base64url"),
        (f"{b64(GOOD_HEADER)}=.e30.", "format", "token header is not base64url"),
        (f"{b64('not json')}.e30.", "format", "token header is not JSON"),
        (f"{b64('[1]')}.e30.", "format", "token header is not a JSON object"),
        (f"{b64(GOOD_HEADER)}.{b64('nope')}.", "format", "token payload is not JSON"),
        (
            f"{b64(GOOD_HEADER)}.{b64('[]')}.",
            "format",
            "token payload is not a JSON object",
        ),
        (f"{b64(GOOD_HEADER)}.e30.***", "format", "token signature is not base64url"),
        (f"{b64(GOOD_HEADER)}.e30.YR", "format", "token signature is not base64url"),
        (compact({"typ": "JWT"}, {}, b""), "format", "token header has no algorithm"),
        (compact({"alg": 1}, {}, b""), "format", "token header has no algorithm"),
        (
            compact({"alg": "RS256", "crit": ["exp"]}, {}, b""),
            "format",
            "unknown critical header parameter",
        ),
        (
            compact({"alg": "RS256", "crit": ["b64"], "b64": False}, {}, b""),
            "format",
            "unknown critical header parameter",
        ),
        (
            compact({"alg": "RS256", "typ": "JOSE"}, {}, b""),
            "format",
            "token type is not JWT",
        ),
        (
            compact({"alg": "RS256", "typ": "dpop+jwt"}, {}, b""),
            "format",
            "token type is not JWT",
        ),
        (
            compact({"alg": "RS256", "typ": 1}, {}, b""),
            "format",
            "token type is not JWT",
        ),
        (
            compact({"alg": "RS256", "kid": 7}, {}, b""),
            "format",
            "token key id is not a string",
        ),
        (
            compact(GOOD_HEADER, '{"exp":NaN}', b""),
            "format",
            "token payload is not JSON",
        ),
        (
            compact(GOOD_HEADER, '{"exp":1e999}', b""),
            "format",
            "token payload is not JSON",
        ),
    ],
)
def test_parse_token_rejects(token: str, check: str, description: str) -> None:
    assert _parse_error(token) == (check, description)


@pytest.mark.parametrize(
    "typ",
    [None, "JWT", "jwt", "at+jwt", "AT+JWT", "application/jwt", "Application/At+JWT"],
)
def test_parse_token_accepts_typ(typ: str | None) -> None:
    header: dict[str, Any] = {"alg": "ES256"}
    if typ is not None:
        header["typ"] = typ
    parsed = parse_token(compact(header, {"iss": "x"}, b"sig"))
    assert (parsed.alg, parsed.kid, parsed.claims, parsed.signature) == (
        "ES256",
        None,
        {"iss": "x"},
        b"sig",
    )


@pytest.mark.parametrize(
    "alg",
    [
        "none",
        "None",
        "NONE",
        "HS256",
        "HS384",
        "HS512",
        "ES256K",
        "RSA-OAEP",
        "",
        "dir",
    ],
)
def test_check_algorithm_supported_rejects(alg: str) -> None:
    with pytest.raises(TokenError) as info:
        check_algorithm_supported(alg)
    assert (info.value.check, info.value.description) == (
        "algorithm",
        "token algorithm not accepted",
    )


def test_check_algorithm_allowed_rejects_outside_idp_list() -> None:
    check_algorithm_allowed("ES256", frozenset({"ES256"}))
    with pytest.raises(TokenError) as info:
        check_algorithm_allowed("RS256", frozenset({"ES256"}))
    assert info.value.description == "token algorithm not allowed for issuer"


# --- claims -------------------------------------------------------------------


_PADDED = "token subject has leading or trailing whitespace"


def _claims_error(payload: dict[str, Any]) -> tuple[str, str]:
    with pytest.raises(TokenError) as info:
        read_claims(payload, "iss")
    return info.value.check, info.value.description


@pytest.mark.parametrize(
    ("payload", "check", "description"),
    [
        ({}, "expiry", "token has no expiry"),
        ({"exp": None}, "expiry", "token exp is not a number"),
        ({"exp": "1900000000"}, "expiry", "token exp is not a number"),
        ({"exp": True}, "expiry", "token exp is not a number"),
        ({"exp": False}, "expiry", "token exp is not a number"),
        ({"exp": [1900000000]}, "expiry", "token exp is not a number"),
        ({"exp": {"v": 1}}, "expiry", "token exp is not a number"),
        ({"exp": float("nan")}, "expiry", "token exp is not a number"),
        ({"exp": float("inf")}, "expiry", "token exp is not a number"),
        ({"exp": 2e9, "nbf": "0"}, "not_before", "token nbf is not a number"),
        ({"exp": 2e9, "nbf": True}, "not_before", "token nbf is not a number"),
        ({"exp": 2e9, "iat": "0"}, "not_before", "token iat is not a number"),
        ({"exp": 2e9, "iat": float("-inf")}, "not_before", "token iat is not a number"),
        ({"exp": 2e9, "sub": 5}, "format", "token subject is malformed"),
        ({"exp": 2e9, "sub": "a\r\nX-Evil: 1"}, "format", "token subject is malformed"),
        ({"exp": 2e9, "sub": "a\x00"}, "format", "token subject is malformed"),
        ({"exp": 2e9, "sub": " admin"}, "format", _PADDED),
        ({"exp": 2e9, "sub": "admin\t"}, "format", "token subject is malformed"),
        ({"exp": 2e9, "sub": "admin "}, "format", _PADDED),
        ({"exp": 2e9, "sub": "\u00a0admin"}, "format", _PADDED),
        ({"exp": 2e9, "sub": "admin\u2028"}, "format", _PADDED),
    ],
)
def test_read_claims_rejects(
    payload: dict[str, Any], check: str, description: str
) -> None:
    assert _claims_error(payload) == (check, description)


@pytest.mark.parametrize("iss", [None, 1, True, ["https://idp"], {"a": 1}])
def test_read_issuer_rejects_non_string(iss: object) -> None:
    payload = {} if iss is None else {"iss": iss}
    with pytest.raises(TokenError) as info:
        read_issuer(payload)
    assert (info.value.check, info.value.description) == (
        "issuer",
        "token has no issuer",
    )


def test_read_claims_keeps_types() -> None:
    c = read_claims(
        {"exp": 10, "nbf": 1.5, "iat": 2, "sub": "s", "aud": ["a", "b"], "x": 1}, "i"
    )
    assert (c.iss, c.sub, c.exp, c.nbf, c.iat, c.aud) == (
        "i",
        "s",
        10.0,
        1.5,
        2.0,
        ("a", "b"),
    )


def test_read_claims_huge_integer_is_a_finite_number() -> None:
    token = compact({"alg": "RS256"}, '{"exp": 123456789012345678901234567890}', b"")
    c = read_claims(parse_token(token).claims, "i")
    assert c.exp == 1.2345678901234568e29


NOW = 1_800_000_000.0


def _c(
    exp: float = NOW + 60,
    nbf: float | None = None,
    iat: float | None = None,
    aud: tuple[str, ...] | None = None,
) -> Claims:
    return Claims("i", "s", exp, nbf, iat, aud)


@pytest.mark.parametrize(
    ("c", "error"),
    [
        (_c(exp=NOW + 1), None),
        (_c(exp=NOW - 29), None),
        (_c(exp=NOW - 30), ("expiry", "token expired")),
        (_c(exp=NOW - 3600), ("expiry", "token expired")),
        (_c(nbf=NOW + 30), None),
        (_c(nbf=NOW + 31), ("not_before", "token not yet valid")),
        (_c(iat=NOW + 30), None),
        (_c(iat=NOW + 31), ("not_before", "token issued in the future")),
    ],
)
def test_check_times_with_skew(c: Claims, error: tuple[str, str] | None) -> None:
    if error is None:
        check_times(c, NOW, 30)
        return
    with pytest.raises(TokenError) as info:
        check_times(c, NOW, 30)
    assert (info.value.check, info.value.description) == error


@pytest.mark.parametrize(
    ("aud", "configured", "error"),
    [
        (None, frozenset(), None),
        (("x",), frozenset(), None),
        ((), frozenset(), None),
        (("api",), frozenset({"api"}), None),
        (("x", "api"), frozenset({"api", "other"}), None),
        (None, frozenset({"api"}), "token has no audience"),
        (("x",), frozenset({"api"}), "token audience not accepted"),
        ((), frozenset({"api"}), "token audience not accepted"),
        (("API",), frozenset({"api"}), "token audience not accepted"),
    ],
)
def test_check_audience(
    aud: Any, configured: frozenset[str], error: str | None
) -> None:
    if error is None:
        check_audience(_c(aud=aud), configured)
        return
    with pytest.raises(TokenError) as info:
        check_audience(_c(aud=aud), configured)
    assert (info.value.check, info.value.description) == ("audience", error)


@pytest.mark.parametrize("aud", [5, [1], ["a", 2], {"a": "b"}, True])
def test_read_claims_malformed_audience_matches_nothing(aud: object) -> None:
    c = read_claims({"exp": 2e9, "aud": aud}, "i")
    assert c.aud == ()


# --- signatures ---------------------------------------------------------------


def _key(private: Any, **extra: Any) -> Any:
    return parse_jwk(jwk(private, "k1", **extra))


SIGNERS = [
    ("RS256", rsa_key()),
    ("RS384", rsa_key()),
    ("RS512", rsa_key()),
    ("PS256", rsa_key()),
    ("PS384", rsa_key()),
    ("PS512", rsa_key()),
    ("ES256", ec_key("P-256")),
    ("ES384", ec_key("P-384")),
    ("ES512", ec_key("P-521")),
    ("EdDSA", ed_key()),
]


@pytest.mark.parametrize(("alg", "private"), SIGNERS)
def test_verify_signature_every_algorithm(alg: str, private: Any) -> None:
    key = _key(private)
    data = b"header.payload"
    sig = raw_sign(alg, private, data)
    assert verify_signature(alg, key, data, sig) is True
    assert verify_signature(alg, key, data + b"x", sig) is False
    assert verify_signature(alg, key, data, sig[:-1] + bytes([sig[-1] ^ 1])) is False


@pytest.mark.parametrize(
    ("alg", "curve"), [("ES256", "P-256"), ("ES384", "P-384"), ("ES512", "P-521")]
)
def test_verify_signature_rejects_der_ecdsa(alg: str, curve: str) -> None:
    private = ec_key(curve)
    data = b"header.payload"
    der = raw_sign(alg, private, data, der=True)
    assert verify_signature(alg, _key(private), data, der) is False


_DATA = b"header.payload"


def _ecdsa(private: Any, hash_: hashes.HashAlgorithm, width: int) -> bytes:
    """A valid ECDSA signature by ``private``, as raw R||S of ``width`` bytes."""
    r, s = decode_dss_signature(private.sign(_DATA, ec.ECDSA(hash_)))
    return r.to_bytes(width, "big") + s.to_bytes(width, "big")


# Each signature is valid for its key: only the key-fits-algorithm check
# refuses it (without that check, some would verify and others would raise).
_MISFITS = [
    ("ES384", ec_key("P-256"), _ecdsa(ec_key("P-256"), hashes.SHA384(), 48)),
    ("ES512", ec_key("P-256"), _ecdsa(ec_key("P-256"), hashes.SHA512(), 66)),
    ("ES256", rsa_key(), raw_sign("PS256", rsa_key(), _DATA)),
    ("ES512", rsa_key(), raw_sign("PS512", rsa_key(), _DATA)),
    ("ES256", ed_key(), raw_sign("EdDSA", ed_key(), _DATA)),
    ("RS256", ed_key(), raw_sign("EdDSA", ed_key(), _DATA)),
    ("EdDSA", rsa_key(), raw_sign("PS256", rsa_key(), _DATA)),
    ("RS256", ec_key(), raw_sign("ES256", ec_key(), _DATA)),
]


@pytest.mark.parametrize(
    ("alg", "private", "sig"),
    _MISFITS,
    ids=[f"{alg} on {type(p).__name__}" for alg, p, _ in _MISFITS],
)
def test_verify_signature_key_must_fit_algorithm(
    alg: str, private: Any, sig: bytes
) -> None:
    assert verify_signature(alg, _key(private), _DATA, sig) is False


def test_verify_signature_respects_jwk_alg() -> None:
    private = rsa_key()
    key = _key(private, alg="RS256")
    data = b"header.payload"
    assert verify_signature("RS256", key, data, raw_sign("RS256", private, data))
    assert not verify_signature("PS256", key, data, raw_sign("PS256", private, data))


def test_parse_token_signed_round_trip() -> None:
    token = sign(rsa_key(), "RS256", payload=claims(exp=int(time.time()) + 5))
    parsed = parse_token(token)
    assert verify_signature(
        "RS256", _key(rsa_key()), parsed.signing_input, parsed.signature
    )


def test_parse_token_hmac_token_is_refused_by_algorithm() -> None:
    parsed = parse_token(hmac_token(b"secret"))
    with pytest.raises(TokenError) as info:
        check_algorithm_supported(parsed.alg)
    assert info.value.check == "algorithm"
