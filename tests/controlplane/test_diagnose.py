"""diagnose-token: the gateway's own validation against a deployment, check by check."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import jwt
import msgspec
import pytest
from aiohttp.test_utils import TestServer

from controlplane.diagnose import REGISTRIES, Registries
from controlplane.records import IdentityProvider, idp_record
from gateway.policy import OAuthSettings
from gateway.store import Store
from tests.controlplane.conftest import Client, call, setup_agent
from tests.fixtures.idp import ES256_RESOURCE, RS256_RESOURCE, OidcProvider
from tests.gateway import tokenkit
from tests.gateway.test_jwks import JwksServer, eventually

DIAGNOSE = "/projects/shop/agents/helper/environments/dev/diagnose-token"
DEPLOY = "/projects/shop/agents/helper/deployments"
LOCAL_KEY = tokenkit.rsa_key(2048, 7)


class Matches:
    """Equal to any string the pattern matches in full."""

    def __init__(self, pattern: str) -> None:
        self.pattern = re.compile(pattern)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and self.pattern.fullmatch(other) is not None

    def __repr__(self) -> str:
        return f"<matches {self.pattern.pattern}>"


def check(name: str, detail: object, ok: bool = True) -> dict[str, object]:
    return {"name": name, "ok": ok, "detail": detail}


@pytest.fixture
async def deployed(api: Client, oidc_provider: OidcProvider) -> Client:
    """helper deployed with oauth, accepting the oidc-provider and a local IdP."""
    await setup_agent(api)
    corp = {"issuer": oidc_provider.issuer, "jwks_uri": oidc_provider.jwks_uri}
    local = {
        "issuer": tokenkit.ISSUER,
        "jwks": {"keys": [tokenkit.jwk(LOCAL_KEY, "k1")]},
        "clock_skew_s": 0,
    }
    for name, body in (("corp", corp), ("local", local)):
        path = f"/environments/dev/identity-providers/{name}"
        assert (await call(api, "PUT", path, body))[0] == 201
    auth = {
        "type": "oauth",
        "oauth": {
            "identity_providers": ["corp", "local"],
            "audiences": [RS256_RESOURCE],
        },
    }
    deploy: dict[str, object] = {"environment": "dev", "endpoint_auth": auth}
    assert (await call(api, "POST", DEPLOY, deploy))[0] == 201
    return api


def _kid(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


async def test_diagnose_valid_provider_token(
    deployed: Client, oidc_provider: OidcProvider
) -> None:
    token = oidc_provider.token()
    status, answer = await call(deployed, "POST", DIAGNOSE, {"token": token})

    assert status == 200
    assert answer == {
        "valid": True,
        "failed_check": None,
        "reason": None,
        "identity_provider": "corp",
        "subject": "agents-client",
        "checks": [
            check("format", "JWS compact, alg RS256"),
            check("issuer", "identity provider corp"),
            check("algorithm", "RS256 allowed"),
            check("key", f"kid {_kid(token)!r}"),
            check("signature", "verified"),
            check("expiry", Matches(r"expires in \d+ s")),
            check("not_before", "valid now"),
            check("audience", f"matches one of {RS256_RESOURCE}"),
        ],
    }
    assert token not in str(answer)


async def test_diagnose_keys_are_fetched_once_per_environment(
    deployed: Client, oidc_provider: OidcProvider
) -> None:
    token = oidc_provider.token()
    for _ in range(3):
        assert (await call(deployed, "POST", DIAGNOSE, {"token": token}))[1]["valid"]

    registry = deployed.app[REGISTRIES].get("dev")
    state = registry.get("corp")
    assert state is not None
    assert registry.version == 2  # corp and local, each applied once


async def test_diagnose_wrong_audience(
    deployed: Client, oidc_provider: OidcProvider
) -> None:
    token = oidc_provider.token(ES256_RESOURCE)
    status, answer = await call(deployed, "POST", DIAGNOSE, {"token": token})

    assert status == 200
    assert answer["checks"][-1] == check(
        "audience", "token audience not accepted", ok=False
    )
    assert (answer["valid"], answer["failed_check"], answer["reason"]) == (
        False,
        "audience",
        "token audience not accepted",
    )
    assert (answer["identity_provider"], answer["subject"]) == ("corp", None)


async def test_diagnose_bad_signature(
    deployed: Client, oidc_provider: OidcProvider
) -> None:
    head, payload, signature = oidc_provider.token().split(".")
    flipped = ("A" if signature[10] != "A" else "B").join(
        (signature[:10], signature[11:])
    )
    token = f"{head}.{payload}.{flipped}"
    status, answer = await call(deployed, "POST", DIAGNOSE, {"token": token})

    assert status == 200
    assert answer == {
        "valid": False,
        "failed_check": "signature",
        "reason": "invalid signature",
        "identity_provider": "corp",
        "subject": None,
        "checks": [
            check("format", "JWS compact, alg RS256"),
            check("issuer", "identity provider corp"),
            check("algorithm", "RS256 allowed"),
            check("key", f"kid {_kid(token)!r}"),
            check("signature", "invalid signature", ok=False),
        ],
    }


def _local(**overrides: Any) -> str:
    payload = tokenkit.claims(aud=RS256_RESOURCE, **overrides)
    return tokenkit.sign(LOCAL_KEY, payload=payload)


@pytest.mark.parametrize(
    ("token", "failed", "reason", "idp"),
    [
        (
            _local(exp=int(time.time()) - 60),
            "expiry",
            "token expired",
            "local",
        ),
        (
            _local(iss="https://elsewhere.example.com"),
            "issuer",
            "token issuer not accepted",
            None,
        ),
        ("not-a-token", "format", "token is not a JWS compact serialization", None),
    ],
)
async def test_diagnose_failed_check_is_named(
    deployed: Client, token: str, failed: str, reason: str, idp: str | None
) -> None:
    status, answer = await call(deployed, "POST", DIAGNOSE, {"token": token})

    assert status == 200
    assert answer["checks"][-1] == check(failed, reason, ok=False)
    assert (answer["valid"], answer["failed_check"], answer["reason"]) == (
        False,
        failed,
        reason,
    )
    assert answer["identity_provider"] == idp


async def test_diagnose_valid_local_token(deployed: Client) -> None:
    status, answer = await call(deployed, "POST", DIAGNOSE, {"token": _local()})
    assert status == 200
    assert (answer["valid"], answer["identity_provider"], answer["subject"]) == (
        True,
        "local",
        "client-1",
    )


@pytest.mark.parametrize(
    "pasted",
    ["{}\n", "{}\r\n", " \t{}  ", "Bearer {}", "bearer\t{}\n", "BEARER   {}"],
)
async def test_diagnose_pasted_line_end_or_prefix_is_forgiven(
    deployed: Client, pasted: str
) -> None:
    body = {"token": pasted.format(_local())}
    status, answer = await call(deployed, "POST", DIAGNOSE, body)
    assert status == 200
    assert (answer["valid"], answer["failed_check"], answer["subject"]) == (
        True,
        None,
        "client-1",
    )


@pytest.mark.parametrize(
    ("pasted", "reason"),
    [
        ("Bearer{}", "token header is not JSON"),
        ("Basic {}", "token header is not base64url"),
    ],
)
async def test_diagnose_other_text_before_the_token_is_a_format_failure(
    deployed: Client, pasted: str, reason: str
) -> None:
    body = {"token": pasted.format(_local())}
    status, answer = await call(deployed, "POST", DIAGNOSE, body)
    assert (status, answer["failed_check"], answer["reason"]) == (
        200,
        "format",
        reason,
    )


async def test_diagnose_never_logs_the_token(
    deployed: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = _local(exp=int(time.time()) - 60)
    await call(deployed, "POST", DIAGNOSE, {"token": token})
    assert token not in caplog.text
    assert token.split(".")[2] not in caplog.text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "$.token"),
        ({"token": ""}, "$.token"),
        ({"token": "x" * 16385}, "$.token"),
        ({"token": 5}, "$.token"),
        ({"token": "a.b.c", "extra": 1}, "$.extra"),
    ],
)
async def test_diagnose_bad_body_is_422(
    deployed: Client, body: dict[str, Any], field: str
) -> None:
    status, answer = await call(deployed, "POST", DIAGNOSE, body)
    assert (status, answer["error"], answer["details"]["field"]) == (
        422,
        "validation_error",
        field,
    )


@pytest.mark.parametrize("auth", ["api_key", "none"])
async def test_diagnose_is_409_unless_oauth(api: Client, auth: str) -> None:
    await setup_agent(api)
    body = {"environment": "dev", "endpoint_auth": {"type": auth}}
    assert (await call(api, "POST", DEPLOY, body))[0] == 201

    assert await call(api, "POST", DIAGNOSE, {"token": "a.b.c"}) == (
        409,
        {
            "error": "diagnose_unavailable",
            "message": f"shop/helper uses {auth} in 'dev': "
            "only oauth deployments validate tokens",
            "details": None,
        },
    )


async def test_diagnose_not_deployed_is_404(api: Client) -> None:
    await setup_agent(api)
    assert await call(api, "POST", DIAGNOSE, {"token": "a.b.c"}) == (
        404,
        {
            "error": "not_found",
            "message": "deployment 'shop/helper in dev' does not exist",
            "details": {"kind": "deployment", "name": "shop/helper in dev"},
        },
    )


async def test_diagnose_identity_provider_with_odd_jwk_is_answered(
    api: Client, store: Store
) -> None:
    # A record stored before JWK member types were checked: one alg is a list.
    await setup_agent(api)
    local = {"issuer": tokenkit.ISSUER, "jwks": {"keys": [tokenkit.jwk(LOCAL_KEY)]}}
    await call(api, "PUT", "/environments/dev/identity-providers/local", local)
    auth = {"type": "oauth", "oauth": {"identity_providers": ["local"]}}
    await call(api, "POST", DEPLOY, {"environment": "dev", "endpoint_auth": auth})
    key = idp_record("dev", "local")
    record = msgspec.json.decode(await store.get(key) or b"", type=IdentityProvider)
    odd = tokenkit.jwk(tokenkit.rsa_key(2048, 8), "odd", alg=["RS256"])
    jwks = {"keys": [odd, tokenkit.jwk(LOCAL_KEY, "k1")]}
    await store.put(
        key, msgspec.json.encode(msgspec.structs.replace(record, jwks=jwks))
    )

    status, answer = await call(api, "POST", DIAGNOSE, {"token": _local()})
    assert status == 200
    assert (answer["valid"], answer["identity_provider"], answer["subject"]) == (
        True,
        "local",
        "client-1",
    )


# --- identity providers no diagnose needs any more ----------------------------


@pytest.fixture
async def jwks_server(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> JwksServer:
    state = JwksServer()
    server = await aiohttp_server(state.app())
    state.base = str(server.make_url("")).rstrip("/")
    return state


async def _put_remote(api: Client, server: JwksServer, name: str = "corp") -> None:
    """An identity provider on the test's JWKS server, refreshed every second."""
    body = {
        "issuer": server.base,
        "jwks_uri": server.base + "/jwks",
        "jwks_refresh_s": 1,
    }
    path = f"/environments/dev/identity-providers/{name}"
    assert (await call(api, "PUT", path, body))[0] == 201


async def _deploy(api: Client, *idps: str) -> None:
    auth = {"type": "oauth", "oauth": {"identity_providers": list(idps)}}
    body = {"environment": "dev", "endpoint_auth": auth}
    assert (await call(api, "POST", DEPLOY, body))[0] == 201


async def _fetches_stopped(server: JwksServer) -> None:
    await asyncio.sleep(0.1)  # a keyring being closed may still be cancelling
    fetched = server.fetches
    await asyncio.sleep(1.5)  # longer than the refresh period
    assert server.fetches == fetched


async def test_diagnose_deleted_identity_provider_stops_being_fetched(
    api: Client, jwks_server: JwksServer
) -> None:
    await setup_agent(api)
    await _put_remote(api, jwks_server)
    local = {
        "issuer": tokenkit.ISSUER,
        "jwks": {"keys": [tokenkit.jwk(LOCAL_KEY, "k1")]},
    }
    await call(api, "PUT", "/environments/dev/identity-providers/local", local)
    await _deploy(api, "corp", "local")
    assert (await call(api, "POST", DIAGNOSE, {"token": _local()}))[1]["valid"]
    await eventually(lambda: jwks_server.fetches >= 2)  # refreshed while kept

    await _deploy(api, "local")
    path = "/environments/dev/identity-providers/corp"
    assert (await call(api, "DELETE", path))[0] == 200
    assert (await call(api, "POST", DIAGNOSE, {"token": _local()}))[1]["valid"]

    registry = api.app[REGISTRIES].get("dev")
    assert (registry.get("corp"), registry.get("local") is not None) == (None, True)
    await _fetches_stopped(jwks_server)


async def test_diagnose_registry_closes_identity_providers_left_idle(
    api: Client, store: Store, jwks_server: JwksServer
) -> None:
    await setup_agent(api)
    await _put_remote(api, jwks_server)
    settings = OAuthSettings(identity_providers=["corp"])
    registries = Registries(idle_s=2)
    registries.start()
    try:
        idps = await registries.sync(store, "dev", settings)
        await asyncio.sleep(1)
        assert await registries.sync(store, "dev", settings) is idps
        await asyncio.sleep(1.3)
        assert idps.get("corp") is not None  # used 1.3 s ago: kept

        await eventually(lambda: idps.get("corp") is None)
        await _fetches_stopped(jwks_server)
    finally:
        await registries.close()
