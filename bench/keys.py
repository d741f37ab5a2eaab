"""The benchmark's own signing key: its JWKS, public PEM and RS256 tokens."""

from __future__ import annotations

import base64
import multiprocessing
import time
from collections.abc import Sequence
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

__all__ = [
    "AUDIENCE",
    "ISSUER",
    "KID",
    "SigningKey",
    "mint_pool",
]

ISSUER = "https://idp.bench.invalid/realms/agents"
AUDIENCE = "agents-api"
KID = "bench-rs256"
_TEN_YEARS_S = 10 * 365 * 86400


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class SigningKey:
    """An RSA-2048 key pair that plays the identity provider."""

    def __init__(self, private: rsa.RSAPrivateKey) -> None:
        self.private = private

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=2048))

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        key = serialization.load_pem_private_key(path.read_bytes(), None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{path} does not hold an RSA private key")
        return cls(key)

    def private_pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )

    def jwks(self) -> dict[str, object]:
        numbers = self.private.public_key().public_numbers()
        jwk = {
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "kid": KID,
            "n": _b64url_uint(numbers.n),
            "e": _b64url_uint(numbers.e),
        }
        return {"keys": [jwk]}

    def mint(self, subject: str, expires_at: float | None = None) -> str:
        """An RS256 access token for ``subject``, valid for years by default."""
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": subject,
            "iat": now,
            "exp": int(expires_at) if expires_at else now + _TEN_YEARS_S,
        }
        headers = {"kid": KID, "typ": "JWT"}
        return jwt.encode(claims, self.private, algorithm="RS256", headers=headers)


def _mint_range(args: tuple[bytes, str, int, int]) -> list[str]:
    pem, prefix, start, stop = args
    key = serialization.load_pem_private_key(pem, None)
    assert isinstance(key, rsa.RSAPrivateKey)
    signer = SigningKey(key)
    return [signer.mint(f"{prefix}-{i}") for i in range(start, stop)]


def mint_pool(
    key: SigningKey, prefix: str, count: int, processes: int = 2
) -> Sequence[str]:
    """``count`` distinct tokens (distinct subjects), signed on every core.

    RSA signing costs about 0.3 ms a token, so large pools are split across
    processes to keep setup short.
    """
    if count < 2000 or processes < 2:
        return _mint_range((key.private_pem(), prefix, 0, count))

    step = -(-count // processes)
    chunks = [
        (key.private_pem(), prefix, lo, min(lo + step, count))
        for lo in range(0, count, step)
    ]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        parts = pool.map(_mint_range, chunks)
    return [token for part in parts for token in part]
