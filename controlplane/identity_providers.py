"""Identity providers of an environment, and discovering where their keys are.

Each change is a commit that writes the record and the ``idp/{name}`` policy,
so the environment's gateways load the new keys at the same revision.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import msgspec
from aiohttp import web

from controlplane.changes import Plan, commit
from controlplane.discovery import discover
from controlplane.environments import load_environment
from controlplane.errors import Conflict, NotFound, ValidationFailed
from controlplane.models import (
    DiscoverBody,
    DiscoverView,
    IdentityProviderBody,
    RevisionView,
    check_url,
)
from controlplane.propagation import WAIT, wait_for
from controlplane.records import Deployment, IdentityProvider, idp_record, now, read
from controlplane.routing import Route, json_response, name_param
from controlplane.state import HTTP_CLIENT, STORE
from gateway.policy import IdentityProviderPolicy, encode_policy, idp_key
from gateway.store import Store

__all__ = ["IdentityProviderList", "agents_using", "routes"]

#: JWK members that carry private or symmetric key material (RFC 7518 §6).
_SECRET_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
#: JWK members the gateway reads, each a string when present.
_STRING_MEMBERS = ("kid", "use", "alg", "crv", "n", "e", "x", "y")


class IdentityProviderList(msgspec.Struct, kw_only=True):
    """Every identity provider of an environment, sorted by name."""

    identity_providers: list[IdentityProvider]


def _check_key_source(body: IdentityProviderBody) -> None:
    given = [
        name
        for name, present in (
            ("jwks_uri", body.jwks_uri is not None),
            ("jwks", body.jwks is not None),
            ("discovery", body.discovery),
        )
        if present
    ]
    if len(given) != 1:
        field = f"$.{given[1]}" if given else "$.jwks_uri"
        raise ValidationFailed(
            field, "give exactly one key source: jwks_uri, jwks or discovery: true"
        )


def _check_jwks(body: IdentityProviderBody) -> None:
    """Inline keys are stored and echoed, so only public keys are accepted."""
    keys = body.jwks.keys if body.jwks is not None else []
    for index, jwk in enumerate(keys):
        field = f"$.jwks.keys[{index}]"
        if not isinstance(jwk.get("kty"), str):
            raise ValidationFailed(field, "a JWK needs a string 'kty'")
        if _SECRET_MEMBERS & jwk.keys():
            raise ValidationFailed(
                field, "private or symmetric key material is not accepted"
            )
        _check_member_types(jwk, field)


def _check_member_types(jwk: dict[str, Any], field: str) -> None:
    """The members the gateway reads must have their RFC 7517/7518 types."""
    for name in _STRING_MEMBERS:
        if name in jwk and not isinstance(jwk[name], str):
            raise ValidationFailed(f"{field}.{name}", "must be a string")
    ops = jwk.get("key_ops")
    if ops is not None and not (
        isinstance(ops, list) and all(isinstance(op, str) for op in ops)
    ):
        raise ValidationFailed(f"{field}.key_ops", "must be an array of strings")


def _check_body(body: IdentityProviderBody) -> None:
    check_url(body.issuer, "$.issuer", plain=True)
    _check_key_source(body)
    if body.jwks_uri is not None:
        check_url(body.jwks_uri, "$.jwks_uri")
    _check_jwks(body)


def _compile(record: IdentityProvider) -> bytes:
    return encode_policy(
        IdentityProviderPolicy(
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
    )


def _record(
    name: str, body: IdentityProviderBody, revision: int, old: IdentityProvider | None
) -> IdentityProvider:
    stamp = now()
    return IdentityProvider(
        name=name,
        issuer=body.issuer,
        jwks_uri=body.jwks_uri,
        jwks=msgspec.to_builtins(body.jwks) if body.jwks is not None else None,
        discovery=body.discovery,
        audiences=body.audiences,
        algorithms=list(body.algorithms),
        clock_skew_s=body.clock_skew_s,
        jwks_refresh_s=body.jwks_refresh_s,
        revision=revision,
        created_at=old.created_at if old else stamp,
        updated_at=stamp,
    )


async def put_identity_provider(
    request: web.Request, body: IdentityProviderBody
) -> web.StreamResponse:
    env, name = name_param(request, "env"), name_param(request, "idp")
    _check_body(body)
    await load_environment(request, env)
    store = request.app[STORE]

    async def plan(revision: int) -> Plan[tuple[IdentityProvider, bool]]:
        old, _ = await read(store, idp_record(env, name), IdentityProvider)
        if old is not None and old.issuer != body.issuer:
            await _check_issuer_unshared(store, env, name, body.issuer)
        record = _record(name, body, revision, old)
        return Plan(
            (record, old is None),
            records={idp_record(env, name): msgspec.json.encode(record)},
            policies={idp_key(name): _compile(record)},
        )

    _, (record, created) = await commit(store, env, plan)
    return json_response(record, 201 if created else 200)


async def _check_issuer_unshared(
    store: Store, env: str, name: str, issuer: str
) -> None:
    """409 if a deployment would then select two identity providers of ``issuer``.

    The gateway would accept the issuer's tokens for one of them only, so the
    deployment would stop working without saying why.
    """
    found = await store.scan(f"identity-providers/{env}/")
    records = [
        msgspec.json.decode(raw, type=IdentityProvider) for raw in found.values()
    ]
    alike = {r.name for r in records if r.issuer == issuer and r.name != name}
    if not alike:
        return
    clashes = await agents_using(store, env, name, also=alike)
    if clashes:
        raise Conflict(
            "duplicate_issuer",
            f"Identity provider {name!r} would share the issuer {issuer!r} with "
            f"{', '.join(sorted(alike))}, selected with it by: {', '.join(clashes)}",
            {"agents": clashes, "identity_providers": sorted(alike)},
        )


async def agents_using(
    store: Store, env: str, idp: str, also: Collection[str] = ()
) -> list[str]:
    """``project/agent`` of every deployment in ``env`` that accepts ``idp``.

    With ``also``, only those that accept one of ``also`` too.
    """
    found = await store.scan("deployments/")
    users = []
    for key, raw in found.items():
        if not key.endswith(f"/{env}"):
            continue
        deployment = msgspec.json.decode(raw, type=Deployment)
        oauth = deployment.endpoint_auth.oauth
        if deployment.environment != env or not oauth:
            continue
        selected = oauth.identity_providers
        if idp in selected and (not also or any(n in selected for n in also)):
            users.append(f"{deployment.project}/{deployment.agent}")
    return users


async def delete_identity_provider(request: web.Request, _: None) -> web.StreamResponse:
    env, name = name_param(request, "env"), name_param(request, "idp")
    wait_s = WAIT.parse(request, 0.0)
    await load_environment(request, env)
    store = request.app[STORE]

    async def plan(revision: int) -> Plan[None]:
        old, _ = await read(store, idp_record(env, name), IdentityProvider)
        if old is None:
            raise NotFound("identity provider", name)
        users = await agents_using(store, env, name)
        if users:
            raise Conflict(
                "identity_provider_in_use",
                f"Identity provider {name!r} is used by: {', '.join(users)}",
                {"agents": users},
            )
        return Plan(
            None, records={idp_record(env, name): None}, policies={idp_key(name): None}
        )

    revision, _ = await commit(store, env, plan)
    state = await wait_for(store, env, revision, wait_s)
    return json_response(RevisionView(revision=revision, propagation=state))


async def list_identity_providers(request: web.Request, _: None) -> web.StreamResponse:
    env = name_param(request, "env")
    await load_environment(request, env)
    found = await request.app[STORE].scan(f"identity-providers/{env}/")
    items = [msgspec.json.decode(raw, type=IdentityProvider) for raw in found.values()]
    return json_response(IdentityProviderList(identity_providers=items))


async def get_identity_provider(request: web.Request, _: None) -> web.StreamResponse:
    env, name = name_param(request, "env"), name_param(request, "idp")
    await load_environment(request, env)
    store = request.app[STORE]
    record, _raw = await read(store, idp_record(env, name), IdentityProvider)
    if record is None:
        raise NotFound("identity provider", name)
    return json_response(record)


async def post_discover(request: web.Request, body: DiscoverBody) -> web.StreamResponse:
    return json_response(await discover(request.app[HTTP_CLIENT], body.url))


_IDP = "/environments/{env}/identity-providers/{idp}"

routes: list[Route[Any]] = [
    Route(
        "PUT",
        _IDP,
        put_identity_provider,
        "Create or update an identity provider",
        IdentityProviderBody,
        {200: IdentityProvider, 201: IdentityProvider},
    ),
    Route(
        "GET",
        "/environments/{env}/identity-providers",
        list_identity_providers,
        "List an environment's identity providers",
        responses={200: IdentityProviderList},
    ),
    Route(
        "GET",
        _IDP,
        get_identity_provider,
        "Read an identity provider",
        responses={200: IdentityProvider},
    ),
    Route(
        "DELETE",
        _IDP,
        delete_identity_provider,
        "Remove an identity provider no deployment uses",
        responses={200: RevisionView},
        query=(WAIT,),
    ),
    Route(
        "POST",
        "/identity-providers/discover",
        post_discover,
        "Resolve an issuer's jwks_uri from its OpenID discovery document",
        DiscoverBody,
        {200: DiscoverView},
    ),
]
