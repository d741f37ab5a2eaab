"""Bearer tokens: extraction, JWS parsing and every claim check, with no I/O.

Each rule of OAuth validation is a small function that either returns or
raises :class:`TokenError` naming the check that failed. The authenticator
and the token diagnosis run these same functions in the same order.
"""

from __future__ import annotations

import binascii
import math
import re
from collections.abc import Collection, Sequence
from typing import Any, Final, cast

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

__all__ = [
    "ALGORITHMS",
    "CHECKS",
    "MAX_TOKEN_LENGTH",
    "Claims",
    "ParsedToken",
    "PublicKey",
    "TokenError",
    "VerificationKey",
    "b64url_decode",
    "check_algorithm_allowed",
    "check_algorithm_supported",
    "check_audience",
    "check_times",
    "extract_token",
    "parse_token",
    "read_claims",
    "read_issuer",
    "verify_signature",
]

#: Names of the checks, in the order they run; diagnosis reports them so.
CHECKS: Final = (
    "format",
    "algorithm",
    "issuer",
    "key",
    "signature",
    "expiry",
    "not_before",
    "audience",
)

#: Longer values are refused before any decoding work.
MAX_TOKEN_LENGTH: Final = 16384

_EdKey = ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | _EdKey


class TokenError(Exception):
    """A token that fails one check; ``check`` is one of :data:`CHECKS`."""

    def __init__(self, check: str, description: str) -> None:
        super().__init__(description)
        self.check = check
        self.description = description


# --- algorithms -------------------------------------------------------------

_SHA = {"256": hashes.SHA256(), "384": hashes.SHA384(), "512": hashes.SHA512()}
_PKCS1 = padding.PKCS1v15()
_PSS = {
    size: padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size)
    for size, h in _SHA.items()
}
_ECDSA = {size: ec.ECDSA(h) for size, h in _SHA.items()}

#: Every asymmetric JWS algorithm the gateway verifies, with its key family.
ALGORITHMS: Final[dict[str, str]] = {
    "RS256": "RSA",
    "RS384": "RSA",
    "RS512": "RSA",
    "PS256": "RSA",
    "PS384": "RSA",
    "PS512": "RSA",
    "ES256": "P-256",
    "ES384": "P-384",
    "ES512": "P-521",
    "EdDSA": "OKP",
}

#: Byte length of one ECDSA coordinate: the raw signature is exactly twice that.
_EC_SIZE = {"ES256": 32, "ES384": 48, "ES512": 66}


class VerificationKey:
    """One usable public key of an identity provider, built once per JWK."""

    __slots__ = ("algorithms", "kid", "kind", "public_key")

    def __init__(
        self,
        kid: str | None,
        public_key: PublicKey,
        algorithms: frozenset[str],
    ) -> None:
        self.kid = kid
        self.public_key = public_key
        self.algorithms = algorithms
        # Decided once here: an isinstance check on these ABCs is slow.
        self.kind = _kind(public_key)


def _kind(public_key: PublicKey) -> str:
    if isinstance(public_key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return "EC"
    return "OKP"


def verify_signature(alg: str, key: VerificationKey, data: bytes, sig: bytes) -> bool:
    """Whether ``sig`` is ``key``'s signature of ``data`` under ``alg``."""
    if alg not in key.algorithms:
        return False
    # The kind was read off the key when it was built (casts cost nothing).
    size = alg[2:]
    try:
        if key.kind == "RSA":
            pad = _PKCS1 if alg[:2] == "RS" else _PSS[size]
            cast(rsa.RSAPublicKey, key.public_key).verify(sig, data, pad, _SHA[size])
        elif key.kind == "EC":
            der = _raw_to_der(alg, sig)
            cast(ec.EllipticCurvePublicKey, key.public_key).verify(
                der, data, _ECDSA[size]
            )
        else:
            cast(_EdKey, key.public_key).verify(sig, data)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _raw_to_der(alg: str, sig: bytes) -> bytes:
    # JWS carries R||S of fixed width; a DER signature has another length and
    # is refused here rather than passed to a DER-accepting verifier.
    n = _EC_SIZE[alg]
    if len(sig) != 2 * n:
        raise InvalidSignature
    r = int.from_bytes(sig[:n], "big")
    s = int.from_bytes(sig[n:], "big")
    return encode_dss_signature(r, s)


# --- extraction -------------------------------------------------------------


def extract_token(values: Sequence[str], prefix: str) -> str | None:
    """The token from the configured header's values; ``None`` when absent.

    ``prefix`` is the configured prefix lower-cased. Two or more header
    lines are a malformed request (ValueError), not a bad token.
    """
    if not values:
        return None
    if len(values) > 1:
        raise ValueError("more than one token header")
    value = values[0]
    if not prefix:
        return value.strip(" \t") or None
    return _after_prefix(value, prefix)


def _after_prefix(value: str, prefix: str) -> str | None:
    # RFC 6750 §3.1: no credential of this scheme (an empty value, the scheme
    # alone, another scheme) is a request without authentication, not a bad
    # token. On the wire "Bearer " arrives as "Bearer": trailing space is cut.
    n = len(prefix)
    if value[:n].lower() != prefix or value[n : n + 1] not in (" ", "\t"):
        return None
    token = value[n:].lstrip(" \t").rstrip(" \t")
    return token or None


# --- parsing ----------------------------------------------------------------

_PAD = ("", None, "==", "=")
# The value of each standard base64 character: the last character of an
# unpadded part may not set bits that the decoded bytes leave unused.
_VALUE = {
    c: i
    for i, c in enumerate(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    )
}
_UNUSED_BITS = (0, 0, 0x0F, 0x03)


def _to_standard(text: str) -> str:
    """base64url text in the standard alphabet, for the strict decoder.

    The standard alphabet's own "+", "/" and "=" become "!" first, which the
    strict decoder refuses like every other character outside the alphabet
    (and any character that is not ASCII). str.replace and ``in`` scan fast.
    """
    if "+" in text or "/" in text or "=" in text:
        text = text.replace("+", "!").replace("/", "!").replace("=", "!")
    return text.replace("-", "+").replace("_", "/")


def b64url_decode(part: str) -> bytes:
    """Strict base64url without padding: only canonical encodings decode."""
    return _b64_standard(_to_standard(part))


def _b64_standard(part: str) -> bytes:
    # ``part`` is base64url already turned to the standard alphabet (above).
    rem = len(part) % 4
    pad = _PAD[rem]
    if pad is None:
        raise ValueError("not base64url")
    if rem and _VALUE.get(part[-1], 0) & _UNUSED_BITS[rem]:
        raise ValueError("non-canonical base64url")
    return binascii.a2b_base64(part + pad, strict_mode=True)


class ParsedToken:
    """A JWS compact token split and decoded, not yet trusted."""

    __slots__ = ("alg", "claims", "header", "kid", "signature", "signing_input")

    def __init__(
        self,
        header: dict[str, Any],
        claims: dict[str, Any],
        signing_input: bytes,
        signature: bytes,
    ) -> None:
        self.header = header
        self.claims = claims
        self.signing_input = signing_input
        self.signature = signature
        self.alg: str = header["alg"]
        self.kid: str | None = header.get("kid")


def parse_token(token: str) -> ParsedToken:
    """Split and decode a JWS compact token and check its protected header."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenError("format", "token too long")
    if token.startswith("{"):
        raise TokenError("format", "JWS JSON serialization is not accepted")
    # One translation for the whole token, then per part.
    parts = _to_standard(token).split(".")
    if len(parts) != 3:
        if len(parts) == 5:
            raise TokenError("format", "encrypted tokens (JWE) are not accepted")
        raise TokenError("format", "token is not a JWS compact serialization")
    header = _json_object(parts[0], "header")
    _check_header(header)
    claims = _json_object(parts[1], "payload")
    signature = _decode_part(parts[2], "signature")
    # The signed bytes are the token's own, "header.payload" as it came:
    # ASCII, since every part decoded.
    signing_input = token[: len(parts[0]) + 1 + len(parts[1])].encode("ascii")
    return ParsedToken(header, claims, signing_input, signature)


def _decode_part(part: str, what: str) -> bytes:
    try:
        return _b64_standard(part)
    except ValueError:  # binascii.Error is one
        raise TokenError("format", f"token {what} is not base64url") from None


def _json_object(part: str, what: str) -> dict[str, Any]:
    raw = _decode_part(part, what)
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise TokenError("format", f"token {what} is not JSON") from None
    if not isinstance(value, dict):
        raise TokenError("format", f"token {what} is not a JSON object")
    return value


_TYPES = frozenset({"jwt", "at+jwt", "application/jwt", "application/at+jwt"})


def _check_header(header: dict[str, Any]) -> None:
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise TokenError("format", "token header has no algorithm")
    if "crit" in header:
        # No JWS extension is understood, so any critical one is unknown.
        raise TokenError("format", "unknown critical header parameter")
    typ = header.get("typ")
    if typ is not None and (not isinstance(typ, str) or typ.lower() not in _TYPES):
        raise TokenError("format", "token type is not JWT")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise TokenError("format", "token key id is not a string")


def check_algorithm_supported(alg: str) -> None:
    """Only asymmetric algorithms: never ``none``, never an HMAC."""
    if alg not in ALGORITHMS:
        raise TokenError("algorithm", "token algorithm not accepted")


def check_algorithm_allowed(alg: str, allowed: Collection[str]) -> None:
    if alg not in allowed:
        raise TokenError("algorithm", "token algorithm not allowed for issuer")


# --- claims -----------------------------------------------------------------


class Claims:
    """The claims the gateway enforces, type-checked."""

    __slots__ = ("aud", "exp", "iat", "iss", "nbf", "sub")

    def __init__(
        self,
        iss: str,
        sub: str | None,
        exp: float,
        nbf: float | None,
        iat: float | None,
        aud: tuple[str, ...] | None,
    ) -> None:
        self.iss = iss
        self.sub = sub
        self.exp = exp
        self.nbf = nbf
        self.iat = iat
        self.aud = aud


def read_issuer(claims: dict[str, Any]) -> str:
    iss = claims.get("iss")
    if not isinstance(iss, str):
        raise TokenError("issuer", "token has no issuer")
    return iss


def read_claims(claims: dict[str, Any], iss: str) -> Claims:
    """Type-check the enforced claims; malformed ones fail their own check."""
    return Claims(
        iss,
        _subject(claims.get("sub")),
        _required_time(claims),
        _time(claims, "nbf", "not_before"),
        _time(claims, "iat", "not_before"),
        _audience(claims.get("aud")),
    )


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _subject(sub: object) -> str | None:
    if sub is None:
        return None
    # The subject becomes an upstream header value: it must be a clean string.
    if not isinstance(sub, str) or _CONTROL.search(sub):
        raise TokenError("format", "token subject is malformed")
    # Header values lose outer whitespace on the way: " admin" would arrive
    # as "admin", another subject.
    if sub != sub.strip():
        raise TokenError("format", "token subject has leading or trailing whitespace")
    return sub


def _required_time(claims: dict[str, Any]) -> float:
    exp = _time(claims, "exp", "expiry")
    if exp is None:
        raise TokenError("expiry", "token has no expiry")
    return exp


_ABSENT: Final = object()


def _time(claims: dict[str, Any], name: str, check: str) -> float | None:
    value = claims.get(name, _ABSENT)
    if value is _ABSENT:
        return None
    # bool is an int subclass in Python, but not a JSON number. An int from
    # JSON fits 64 bits (orjson), so it is finite as a float too.
    kind = type(value)
    if kind is int:
        return float(value)
    if kind is not float or not math.isfinite(value):
        raise TokenError(check, f"token {name} is not a number")
    return cast(float, value)


def _audience(aud: object) -> tuple[str, ...] | None:
    if aud is None:
        return None
    if isinstance(aud, str):
        return (aud,)
    if isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        return tuple(aud)
    return ()


def check_times(claims: Claims, now: float, skew: float) -> None:
    if claims.exp <= now - skew:
        raise TokenError("expiry", "token expired")
    if claims.nbf is not None and claims.nbf > now + skew:
        raise TokenError("not_before", "token not yet valid")
    if claims.iat is not None and claims.iat > now + skew:
        raise TokenError("not_before", "token issued in the future")


def check_audience(claims: Claims, audiences: frozenset[str]) -> None:
    if not audiences:
        return
    if claims.aud is None:
        raise TokenError("audience", "token has no audience")
    if audiences.isdisjoint(claims.aud):
        raise TokenError("audience", "token audience not accepted")
