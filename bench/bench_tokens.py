"""Microseconds per OAuth token validation, on a cache miss and on a cache hit.

    .venv/bin/python -m bench.bench_tokens [--misses 2000] [--hits 100000]

Runs the gateway's own authenticator in one event loop (uvloop), with an
identity provider whose keys are inline, so no network time is measured.
For comparison it times PyJWT's ``jwt.decode`` making the same checks on
the same tokens. Last, it sends 1,000 concurrent tokens naming unknown
``kid``s at an identity provider served over HTTP and counts the JWK set
fetches they cause (one is the contract, however many such tokens come).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import secrets
import time
from typing import Any

import jwt
import uvloop
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.auth import AuthFailure
from gateway.oauth import IdentityProviders, OAuthAuthenticator
from gateway.policy import IdentityProviderPolicy, OAuthSettings

__all__ = ["main"]

ISSUER = "https://idp.bench/realms/agents"


def _public_jwk(private: Any, kid: str, alg: str) -> dict[str, Any]:
    algorithm = jwt.get_algorithm_by_name(alg)
    doc = json.loads(algorithm.to_jwk(private.public_key()))
    return {**doc, "kid": kid, "alg": alg, "use": "sig"}


def _tokens(
    private: Any, kid: str, alg: str, count: int, issuer: str = ISSUER
) -> list[str]:
    now = int(time.time())
    head = {"kid": kid, "typ": "at+jwt"}
    return [
        jwt.encode(
            {
                "iss": issuer,
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
    keys: dict[str, tuple[Any, str]] = {
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
        tokens = _tokens(private, kid, alg, misses)
        fresh = [_headers(t) for t in tokens]
        miss = await _per_call_us(auth, fresh)
        await _per_call_us(auth, [fresh[0]] * 1000)  # warm-up
        hit = await _per_call_us(auth, [fresh[0]] * hits)
        pyjwt = _pyjwt_us(tokens, private.public_key(), alg)
        print(
            f"{alg}: cache miss {miss:8.1f} µs/token   cache hit {hit:6.2f} µs/token"
            f"   (PyJWT jwt.decode, same checks: {pyjwt:6.1f} µs/token)"
        )
    await idps.close()


def _pyjwt_us(tokens: list[str], public_key: Any, alg: str) -> float:
    options = {"require": ["exp", "iss"]}
    start = time.perf_counter()
    for token in tokens:
        jwt.decode(
            token,
            public_key,
            algorithms=[alg],
            audience="agents-api",
            issuer=ISSUER,
            leeway=30,
            options=options,  # type: ignore[arg-type]
        )
    return (time.perf_counter() - start) / len(tokens) * 1e6


async def _unknown_kid_storm(requests: int) -> None:
    """Concurrent tokens with unknown kids against a JWK set served over HTTP."""
    private = ec.generate_private_key(ec.SECP256R1())
    keys = {"keys": [_public_jwk(private, "known", "ES256")]}
    fetches = 0

    async def jwks(request: web.Request) -> web.Response:
        nonlocal fetches
        fetches += 1
        await asyncio.sleep(0.05)  # a provider a little slow to answer
        return web.json_response(keys)

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    issuer = f"http://127.0.0.1:{port}"

    cooldown = 1.0
    idps = IdentityProviders(cooldown_s=cooldown)
    idps.apply(
        "remote",
        IdentityProviderPolicy(name="remote", issuer=issuer, jwks_uri=issuer + "/jwks"),
    )
    auth = OAuthAuthenticator(OAuthSettings(identity_providers=["remote"]), idps)
    await auth.authenticate(_headers(_tokens(private, "known", "ES256", 1, issuer)[0]))
    await asyncio.sleep(cooldown + 0.1)  # the storm may cause one refetch
    before = fetches

    tokens = [
        _tokens(private, secrets.token_hex(8), "ES256", 1, issuer)[0]
        for _ in range(requests)
    ]
    answers = await asyncio.gather(
        *(auth.authenticate(_headers(t)) for t in tokens), return_exceptions=True
    )
    refused = sum(isinstance(a, AuthFailure) and a.status == 401 for a in answers)
    print(
        f"{requests} concurrent tokens with unknown kids: {fetches - before} JWK set "
        f"fetch(es), {refused} answered 401"
    )
    await idps.close()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--misses", type=int, default=2000)
    parser.add_argument("--hits", type=int, default=100_000)
    parser.add_argument("--storm", type=int, default=1000)
    args = parser.parse_args()
    uvloop.run(_bench(args.misses, args.hits))
    uvloop.run(_unknown_kid_storm(args.storm))


if __name__ == "__main__":
    main()
