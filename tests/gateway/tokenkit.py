"""Keys and tokens built by the tests themselves, honest and hostile."""

from __future__ import annotations

import base64
import functools
import hmac
import json
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

__all__ = [
    "ISSUER",
    "b64",
    "compact",
    "ec_key",
    "claims",
    "ed_key",
    "hmac_token",
    "jwk",
    "pem",
    "raw_sign",
    "rsa_key",
    "sign",
]

ISSUER = "https://idp.test/realms/agents"


@functools.cache
def rsa_key(bits: int = 2048, n: int = 0) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@functools.cache
def ec_key(curve: str = "P-256", n: int = 0) -> ec.EllipticCurvePrivateKey:
    curves = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}
    return ec.generate_private_key(curves[curve])


@functools.cache
def ed_key(n: int = 0) -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def jwk(private: Any, kid: str | None = None, **extra: Any) -> dict[str, Any]:
    """The public JWK of a private key, with optional members added."""
    public = private.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        doc = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public))
    elif isinstance(public, ec.EllipticCurvePublicKey):
        doc = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public))
    else:
        doc = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(public))
    if kid is not None:
        doc["kid"] = kid
    doc.update(extra)
    return dict(doc)


def b64(data: bytes | str | dict[str, Any]) -> str:
    if isinstance(data, dict):
        data = json.dumps(data)
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "client-1",
        "aud": "agents-api",
        "iat": now,
        "exp": now + 600,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not ...}


_HASH = {"256": hashes.SHA256(), "384": hashes.SHA384(), "512": hashes.SHA512()}


def raw_sign(alg: str, private: Any, data: bytes, der: bool = False) -> bytes:
    """Sign as JWS does (ECDSA as raw R||S unless ``der``)."""
    if alg == "EdDSA":
        return bytes(private.sign(data))
    h = _HASH[alg[2:]]
    if alg.startswith("RS"):
        return bytes(private.sign(data, padding.PKCS1v15(), h))
    if alg.startswith("PS"):
        pss = padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size)
        return bytes(private.sign(data, pss, h))
    signature = private.sign(data, ec.ECDSA(h))
    if der:
        return bytes(signature)
    size = (private.curve.key_size + 7) // 8
    r, s = decode_dss_signature(signature)
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def compact(
    header: dict[str, Any] | str, payload: dict[str, Any] | str, sig: bytes
) -> str:
    return f"{b64(header)}.{b64(payload)}.{b64(sig)}"


def sign(
    private: Any,
    alg: str = "RS256",
    kid: str | None = "k1",
    payload: dict[str, Any] | None = None,
    der: bool = False,
    **header: Any,
) -> str:
    """A signed compact JWS with full control over header and claims."""
    head: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        head["kid"] = kid
    head.update(header)
    head = {k: v for k, v in head.items() if v is not ...}
    body = claims() if payload is None else payload
    signing_input = f"{b64(head)}.{b64(body)}".encode()
    return f"{signing_input.decode()}.{b64(raw_sign(alg, private, signing_input, der))}"


def hmac_token(secret: bytes, alg: str = "HS256", kid: str = "k1") -> str:
    """An HMAC token keyed with ``secret`` (e.g. the public key's bytes)."""
    head = {"alg": alg, "typ": "JWT", "kid": kid}
    signing_input = f"{b64(head)}.{b64(claims())}".encode()
    digest = {"HS256": "sha256", "HS384": "sha384", "HS512": "sha512"}[alg]
    mac = hmac.new(secret, signing_input, digest).digest()
    return f"{signing_input.decode()}.{b64(mac)}"


def pem(private: Any) -> bytes:
    return bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
