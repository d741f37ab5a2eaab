"""``diagnose-token``: why the gateway would accept or refuse a token, check by check.

The gateway's own validation (:func:`gateway.oauth.diagnose`) runs here
against the deployment's current settings and the identity providers it
selects, read from the store. Each environment has one
:class:`~gateway.oauth.IdentityProviders` registry in this process, created on
first use, so an identity provider's keys are fetched once and refreshed like
a gateway worker's, not on every call, until the identity provider is deleted
or no diagnose uses it for a while. The token is never answered or logged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from aiohttp import web

from controlplane.deployments import load_deployment
from controlplane.errors import Conflict
from controlplane.records import IdentityProvider, idp_record
from controlplane.routing import Route, json_response, name_param
from controlplane.state import STORE
from gateway.oauth import Diagnosis, IdentityProviders, diagnose
from gateway.policy import IdentityProviderPolicy, OAuthSettings
from gateway.store import Store

__all__ = ["IDLE_S", "DiagnoseBody", "Registries", "routes", "setup"]

#: The gateway refuses larger header lines, so no larger token can reach it.
MAX_TOKEN_CHARS = 16 * 1024

#: An identity provider no diagnose selected for this long stops being fetched.
IDLE_S = 300.0


class DiagnoseBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST …/diagnose-token``: the token, as sent after the prefix."""

    token: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TOKEN_CHARS)]

    def __repr__(self) -> str:
        return "DiagnoseBody(token=<hidden>)"


class Registries:
    """One identity-provider registry per environment, closed with the app.

    An identity provider is kept while a diagnosed deployment selects it: one
    deleted from the store goes at the next diagnose in its environment, one
    no diagnose has selected for ``idle_s`` goes at the next sweep. Without
    that, a keyring would go on fetching keys nobody asks about.
    """

    def __init__(self, idle_s: float = IDLE_S) -> None:
        self.idle_s = idle_s
        self._by_env: dict[str, IdentityProviders] = {}
        self._used: dict[str, dict[str, float]] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def get(self, env: str) -> IdentityProviders:
        registry = self._by_env.get(env)
        if registry is None:
            registry = self._by_env[env] = IdentityProviders()
            self._used[env] = {}
        return registry

    async def sync(
        self, store: Store, env: str, settings: OAuthSettings
    ) -> IdentityProviders:
        """The environment's registry, brought up to the store's records.

        Applying an unchanged policy keeps its keys, so this costs one scan
        of the environment's identity providers and no fetch once keys are
        loaded.
        """
        records = await _records(store, env)
        # Nothing is awaited from here on, so no sweep runs in between.
        idps, used = self.get(env), self._used[env]
        now = time.monotonic()
        for name in settings.identity_providers:
            record = records.get(name)
            idps.apply(name, _policy(record) if record is not None else None)
            used[name] = now
        for name in [name for name in used if name not in records]:
            self._drop(env, name)
        return idps

    def start(self) -> None:
        """Begin sweeping idle identity providers; needs a running loop."""
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        registries = list(self._by_env.values())
        self._by_env.clear()
        self._used.clear()
        for registry in registries:
            await registry.close()

    def _drop(self, env: str, name: str) -> None:
        self._by_env[env].apply(name, None)
        del self._used[env][name]

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(max(self.idle_s / 5, 0.05))
            await self._close_idle(time.monotonic() - self.idle_s)

    async def _close_idle(self, before: float) -> None:
        for env, used in list(self._used.items()):
            for name in [name for name, at in used.items() if at < before]:
                self._drop(env, name)
            if not used:
                # An environment with none left gives up its HTTP session too.
                del self._used[env]
                await self._by_env.pop(env).close()


REGISTRIES = web.AppKey("idp_registries", Registries)


async def _records(store: Store, env: str) -> dict[str, IdentityProvider]:
    found = await store.scan(idp_record(env, ""))
    decoded = (
        msgspec.json.decode(raw, type=IdentityProvider) for raw in found.values()
    )
    return {record.name: record for record in decoded}


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

    idps = await request.app[REGISTRIES].sync(request.app[STORE], env, settings)
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
    app[REGISTRIES].start()
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
