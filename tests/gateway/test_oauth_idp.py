"""OAuth validation against a real OpenID Connect provider process (oidc-provider)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.auth import AuthFailure
from gateway.oauth import IdentityProviders, OAuthAuthenticator, diagnose
from gateway.policy import IdentityProviderPolicy, OAuthSettings
from tests.fixtures.idp import ES256_RESOURCE, RS256_RESOURCE, OidcProvider


@pytest.fixture
async def idps() -> AsyncIterator[IdentityProviders]:
    providers = IdentityProviders(cooldown_s=0.2)
    yield providers
    await providers.close()


def register(idps: IdentityProviders, provider: OidcProvider, **fields: Any) -> None:
    idps.apply(
        "corp", IdentityProviderPolicy(name="corp", issuer=provider.issuer, **fields)
    )


async def call(idps: IdentityProviders, token: str, **settings: Any) -> tuple[str, ...]:
    auth = OAuthAuthenticator(
        OAuthSettings(identity_providers=["corp"], **settings), idps
    )
    headers = CIMultiDictProxy(CIMultiDict([("Authorization", f"Bearer {token}")]))
    try:
        identity = await auth.authenticate(headers)
    except AuthFailure as failure:
        return (str(failure.status), failure.message)
    return tuple(value for _, value in identity.headers)


async def test_oidc_provider_token_by_discovery(
    oidc_provider: OidcProvider, idps: IdentityProviders
) -> None:
    register(idps, oidc_provider, discovery=True, audiences=[RS256_RESOURCE])
    token = await asyncio.to_thread(oidc_provider.token, RS256_RESOURCE)
    assert await call(idps, token) == ("agents-client", oidc_provider.issuer, "corp")


async def test_oidc_provider_es256_token_by_jwks_uri(
    oidc_provider: OidcProvider, idps: IdentityProviders
) -> None:
    register(idps, oidc_provider, jwks_uri=oidc_provider.jwks_uri, algorithms=["ES256"])
    token = await asyncio.to_thread(oidc_provider.token, ES256_RESOURCE)
    assert await call(idps, token, audiences=[ES256_RESOURCE]) == (
        "agents-client",
        oidc_provider.issuer,
        "corp",
    )
    assert await call(idps, token, audiences=[RS256_RESOURCE]) == (
        "401",
        "Invalid bearer token: token audience not accepted",
    )


async def test_oidc_provider_algorithm_not_allowed(
    oidc_provider: OidcProvider, idps: IdentityProviders
) -> None:
    register(idps, oidc_provider, jwks_uri=oidc_provider.jwks_uri, algorithms=["ES256"])
    token = await asyncio.to_thread(oidc_provider.token, RS256_RESOURCE)
    assert await call(idps, token) == (
        "401",
        "Invalid bearer token: token algorithm not allowed for issuer",
    )


async def test_oidc_provider_key_rotation_without_restart(
    fresh_oidc_provider: OidcProvider, idps: IdentityProviders
) -> None:
    provider = fresh_oidc_provider
    register(idps, provider, discovery=True)
    old = await asyncio.to_thread(provider.token, ES256_RESOURCE)
    assert await call(idps, old) == ("agents-client", provider.issuer, "corp")

    assert await asyncio.to_thread(provider.rotate) == 2
    new = await asyncio.to_thread(provider.token, ES256_RESOURCE)
    await asyncio.sleep(0.25)  # the refetch cooldown after the first fetch
    assert await call(idps, new) == ("agents-client", provider.issuer, "corp")
    # The old key is no longer published, so its tokens stop working.
    assert await call(idps, old) == (
        "401",
        "Invalid bearer token: unknown key for the token's algorithm",
    )


async def test_oidc_provider_diagnose_real_token(
    oidc_provider: OidcProvider, idps: IdentityProviders
) -> None:
    register(idps, oidc_provider, discovery=True)
    token = await asyncio.to_thread(oidc_provider.token, RS256_RESOURCE)
    result = await diagnose(token, OAuthSettings(identity_providers=["corp"]), idps)
    assert (result.valid, result.identity_provider, result.subject) == (
        True,
        "corp",
        "agents-client",
    )
