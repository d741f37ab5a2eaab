"""Microseconds per OAuth token validation, on a cache miss and on a cache hit.

    .venv/bin/python bench/bench_tokens.py [--misses 2000] [--hits 100000]

Runs the gateway's own authenticator in one event loop (uvloop), with an
identity provider whose keys are inline, so no network time is measured.
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from typing import Any

import jwt
import uvloop
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.oauth import IdentityProviders, OAuthAuthenticator
from gateway.policy import IdentityProviderPolicy, OAuthSettings

__all__ = ["main"]

ISSUER = "https://idp.bench/realms/agents"


def _public_jwk(private: Any, kid: str, alg: str) -> dict[str, Any]:
    algorithm = jwt.get_algorithm_by_name(alg)
    doc = json.loads(algorithm.to_jwk(private.public_key()))
    return {**doc, "kid": kid, "alg": alg, "use": "sig"}


def _tokens(private: Any, kid: str, alg: str, count: int) -> list[str]:
    now = int(time.time())
    head = {"kid": kid, "typ": "at+jwt"}
    return [
        jwt.encode(
            {
                "iss": ISSUER,
                "sub": f"client-{i}",
                "aud": "agents-api",
                "iat": now,
                "exp": now + 3600,
                "jti": base64.b64encode(bytes(8)).decode(),
            },
            private,
            algorithm=alg,
            headers=head,
        )
        for i in range(count)
    ]


def _headers(token: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict([("Authorization", f"Bearer {token}")]))


async def _per_call_us(auth: OAuthAuthenticator, headers: list[Any]) -> float:
    start = time.perf_counter()
    for h in headers:
        await auth.authenticate(h)
    return (time.perf_counter() - start) / len(headers) * 1e6


async def _bench(misses: int, hits: int) -> None:
    keys = {
        "RS256": (rsa.generate_private_key(public_exponent=65537, key_size=2048), "r1"),
        "ES256": (ec.generate_private_key(ec.SECP256R1()), "e1"),
    }
    idps = IdentityProviders()
    jwks = [_public_jwk(private, kid, alg) for alg, (private, kid) in keys.items()]
    idps.apply(
        "bench",
        IdentityProviderPolicy(
            name="bench", issuer=ISSUER, jwks={"keys": jwks}, audiences=["agents-api"]
        ),
    )
    auth = OAuthAuthenticator(OAuthSettings(identity_providers=["bench"]), idps)
    idps.cache.max_entries = misses * 2 + 10

    for alg, (private, kid) in keys.items():
        fresh = [_headers(t) for t in _tokens(private, kid, alg, misses)]
        miss = await _per_call_us(auth, fresh)
        await _per_call_us(auth, [fresh[0]] * 1000)  # warm-up
        hit = await _per_call_us(auth, [fresh[0]] * hits)
        print(f"{alg}: cache miss {miss:8.1f} µs/token   cache hit {hit:6.2f} µs/token")
    await idps.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--misses", type=int, default=2000)
    parser.add_argument("--hits", type=int, default=100_000)
    args = parser.parse_args()
    uvloop.run(_bench(args.misses, args.hits))


if __name__ == "__main__":
    main()
