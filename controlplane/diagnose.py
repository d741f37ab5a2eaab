"""``diagnose-token``: why the gateway would accept or refuse a token, check by check.

The gateway's own validation (:func:`gateway.oauth.diagnose`) runs here
against the deployment's current settings and the identity providers it
selects, read from the store. Each environment has one
:class:`~gateway.oauth.IdentityProviders` registry in this process, created on
first use, so an identity provider's keys are fetched once and refreshed like
a gateway worker's, not on every call. The token is never answered or logged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from aiohttp import web

from controlplane.deployments import load_deployment
from controlplane.errors import Conflict
from controlplane.records import IdentityProvider, idp_record, read
from controlplane.routing import Route, json_response, name_param
from controlplane.state import STORE
from gateway.oauth import Diagnosis, IdentityProviders, diagnose
from gateway.policy import IdentityProviderPolicy, OAuthSettings
from gateway.store import Store

__all__ = ["DiagnoseBody", "Registries", "routes", "setup"]

#: The gateway refuses larger header lines, so no larger token can reach it.
MAX_TOKEN_CHARS = 16 * 1024


class DiagnoseBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST …/diagnose-token``: the token, as sent after the prefix."""

    token: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TOKEN_CHARS)]

    def __repr__(self) -> str:
        return "DiagnoseBody(token=<hidden>)"


class Registries:
    """One identity-provider registry per environment, closed with the app."""

    def __init__(self) -> None:
        self._by_env: dict[str, IdentityProviders] = {}

    def get(self, env: str) -> IdentityProviders:
        registry = self._by_env.get(env)
        if registry is None:
            registry = self._by_env[env] = IdentityProviders()
        return registry

    async def close(self) -> None:
        for registry in self._by_env.values():
            await registry.close()
        self._by_env.clear()


REGISTRIES = web.AppKey("idp_registries", Registries)


def _policy(record: IdentityProvider) -> IdentityProviderPolicy:
    return IdentityProviderPolicy(
        name=record.name,
        issuer=record.issuer,
        jwks_uri=record.jwks_uri,
        jwks=record.jwks,
        discovery=record.discovery,
        audiences=record.audiences,
        algorithms=record.algorithms,
        clock_skew_s=record.clock_skew_s,
        jwks_refresh_s=record.jwks_refresh_s,
    )


async def _sync(
    store: Store, env: str, settings: OAuthSettings, idps: IdentityProviders
) -> None:
    """Bring the selected identity providers up to the store's records.

    Applying an unchanged policy keeps its keys, so this costs one read per
    identity provider and no fetch once keys are loaded.
    """
    for name in settings.identity_providers:
        record, _ = await read(store, idp_record(env, name), IdentityProvider)
        idps.apply(name, _policy(record) if record is not None else None)


async def post_diagnose(request: web.Request, body: DiagnoseBody) -> web.StreamResponse:
    project, agent = name_param(request, "project"), name_param(request, "agent")
    env = name_param(request, "env")
    deployment, _ = await load_deployment(request, project, agent, env)
    settings = deployment.endpoint_auth.oauth
    if deployment.endpoint_auth.type != "oauth" or settings is None:
        raise Conflict(
            "diagnose_unavailable",
            f"{project}/{agent} uses {deployment.endpoint_auth.type} in {env!r}: "
            "only oauth deployments validate tokens",
        )

    idps = request.app[REGISTRIES].get(env)
    await _sync(request.app[STORE], env, settings, idps)
    token = _pasted(body.token, settings.auth_header_prefix)
    return json_response(await diagnose(token, settings, idps))


def _pasted(token: str, prefix: str) -> str:
    """The token as pasted, forgiving surrounding whitespace and the prefix."""
    token = token.strip()
    if prefix and token[: len(prefix)].lower() == prefix.lower():
        rest = token[len(prefix) :]
        if rest[:1].isspace():
            return rest.strip()
    return token


async def _registries(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[REGISTRIES].close()


def setup(app: web.Application) -> None:
    """The per-environment registries ``diagnose-token`` keeps in this process."""
    app[REGISTRIES] = Registries()
    app.cleanup_ctx.append(_registries)


routes: list[Route[Any]] = [
    Route(
        "POST",
        "/projects/{project}/agents/{agent}/environments/{env}/diagnose-token",
        post_diagnose,
        "Run the gateway's validation on a token against this deployment",
        DiagnoseBody,
        {200: Diagnosis},
    ),
]
