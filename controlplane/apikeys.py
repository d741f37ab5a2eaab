"""API keys of an agent in one environment: created, listed, rotated, revoked.

A key's secret is shown once, in the answer that creates it; the store keeps
only its SHA-256 (:func:`gateway.policy.hash_api_key`). Each change is one
commit writing the ``api-keys/{env}/{project}/{agent}/{name}`` record and the
``apikey/{hash}`` policy, so every gateway of the environment enforces it at
the revision the answer names.

While the agent's deployment in the environment uses ``oauth``, every call
here answers 409: keys are then stored but inactive, since the gateway's
OAuth route never consults them.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any

import msgspec
from aiohttp import web

from controlplane.changes import Plan, commit
from controlplane.environments import load_environment
from controlplane.errors import Conflict, NotFound, ValidationFailed
from controlplane.models import Name, Propagation, RevisionView
from controlplane.projects import load_agent
from controlplane.propagation import WAIT, wait_for
from controlplane.records import Deployment, deployment_record, now, read, rfc3339
from controlplane.routing import Route, json_response, name_param
from controlplane.state import STORE
from gateway.policy import ApiKeyPolicy, apikey_key, encode_policy, hash_api_key
from gateway.store import Store

__all__ = [
    "KEY_PREFIX",
    "ApiKey",
    "ApiKeyBody",
    "ApiKeyList",
    "ApiKeySecretView",
    "ApiKeyView",
    "apikey_record",
    "check_keys_enabled",
    "expiry_epoch",
    "mint",
    "new_key",
    "parse_expiry",
    "replace_key",
    "routes",
]

#: Marks a string as one of our keys, so secret scanners can recognise it.
KEY_PREFIX = "agw_"
#: 32 bytes = 256 bits from the operating system's CSPRNG.
_KEY_BYTES = 32
_MASK = "****"

_RFC3339 = re.compile(
    r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:[Zz]|[+-]\d\d:\d\d)"
)
#: 9999-12-31T23:59:59Z: records write four-digit UTC years, so a later
#: instant (9999-12-31T23:59:59-01:00 is one) cannot be stored.
_LAST_EPOCH = 253402300799.0


class ApiKey(msgspec.Struct, kw_only=True):
    """API-key metadata as stored: never the secret, only its hash."""

    name: str
    key_hash: str
    masked: str
    created_at: str
    expires_at: str | None = None
    hidden: bool = False


class ApiKeyBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST …/api-keys``: a name, and optionally an RFC 3339 expiry."""

    name: Name
    expires_at: Annotated[str, msgspec.Meta(max_length=64)] | None = None


class ApiKeyView(msgspec.Struct, kw_only=True):
    """A key as listed: no secret, no hash."""

    name: str
    masked: str
    created_at: str
    expires_at: str | None


class ApiKeyList(msgspec.Struct, kw_only=True):
    """Every key of an agent in an environment, sorted by name."""

    api_keys: list[ApiKeyView]


class ApiKeySecretView(msgspec.Struct, kw_only=True):
    """A new secret, shown in this answer only, and how far it has propagated."""

    name: str
    key: str
    masked: str
    created_at: str
    expires_at: str | None
    revision: int
    propagation: Propagation


def apikey_record(env: str, project: str, agent: str, name: str) -> str:
    return f"api-keys/{env}/{project}/{agent}/{name}"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(_KEY_BYTES)


def _masked(key: str) -> str:
    return _MASK + key[-4:]


def parse_expiry(value: str, field: str = "$.expires_at") -> float:
    """Epoch seconds (whole) of an RFC 3339 time that lies in the future."""
    if _RFC3339.fullmatch(value) is None:
        raise ValidationFailed(field, "must be an RFC 3339 time with a UTC offset")
    try:
        moment = datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        raise ValidationFailed(field, "is not a valid date and time") from None

    # Records keep second precision; the policy gets the same instant.
    epoch = float(int(moment.timestamp()))
    if epoch <= time.time():
        raise ValidationFailed(field, "must be in the future")
    if epoch > _LAST_EPOCH:
        raise ValidationFailed(field, "must be no later than 9999-12-31T23:59:59Z")
    return epoch


def mint(
    name: str, expires_at: float | None, *, hidden: bool = False
) -> tuple[str, ApiKey]:
    """A fresh secret and the record that stores its hash."""
    key = new_key()
    record = ApiKey(
        name=name,
        key_hash=hash_api_key(key),
        masked=_masked(key),
        created_at=now(),
        expires_at=rfc3339(expires_at) if expires_at is not None else None,
        hidden=hidden,
    )
    return key, record


def expiry_epoch(record: ApiKey) -> float | None:
    if record.expires_at is None:
        return None
    return datetime.fromisoformat(record.expires_at).timestamp()


def _policy(project: str, agent: str, record: ApiKey) -> bytes:
    epoch = expiry_epoch(record)
    return encode_policy(
        ApiKeyPolicy(project=project, agent=agent, name=record.name, expires_at=epoch)
    )


def replace_key(
    where: tuple[str, str, str],
    name: str,
    old: ApiKey | None,
    new: ApiKey | None,
) -> tuple[dict[str, bytes | None], dict[str, bytes | None]]:
    """Records and policies of one change to key ``name`` of (env, project, agent).

    ``old`` goes and ``new`` comes; either may be None (a creation, a
    revocation). A rotation has both, so the old secret stops working at the
    very revision the new one starts.
    """
    env, project, agent = where
    value = msgspec.json.encode(new) if new is not None else None
    records = {apikey_record(env, project, agent, name): value}
    policies: dict[str, bytes | None] = {}
    if old is not None:
        policies[apikey_key(old.key_hash)] = None
    if new is not None:
        policies[apikey_key(new.key_hash)] = _policy(project, agent, new)
    return records, policies


async def check_keys_enabled(store: Store, env: str, project: str, agent: str) -> None:
    """409 while the agent's deployment in ``env`` uses OAuth."""
    deployment, _ = await read(
        store, deployment_record(project, agent, env), Deployment
    )
    if deployment is not None and deployment.endpoint_auth.type == "oauth":
        raise Conflict(
            "api_keys_disabled",
            f"{project}/{agent} uses oauth in {env!r}: API keys are disabled "
            "there until it is deployed with api_key again",
        )


async def _read_key(
    store: Store, env: str, project: str, agent: str, name: str
) -> ApiKey | None:
    record, _ = await read(store, apikey_record(env, project, agent, name), ApiKey)
    return record


async def _load_key(
    store: Store, env: str, project: str, agent: str, name: str
) -> ApiKey:
    record = await _read_key(store, env, project, agent, name)
    if record is None or record.hidden:
        raise NotFound("api key", name)
    return record


Guard = Callable[[], Awaitable[None]]


class _Target:
    """The agent and environment an API-key call is about, all checked to exist."""

    def __init__(self, request: web.Request) -> None:
        self.project = name_param(request, "project")
        self.agent = name_param(request, "agent")
        self.env = name_param(request, "env")
        self.store = request.app[STORE]

    async def check(self, request: web.Request) -> None:
        await load_agent(request, self.project, self.agent)
        await load_environment(request, self.env)
        await check_keys_enabled(self.store, self.env, self.project, self.agent)

    async def commit(
        self, name: str, old: ApiKey | None, new: ApiKey | None, guard: Guard
    ) -> int:
        """Commit ``old`` -> ``new``, re-checking ``guard`` and exclusion first."""
        where = (self.env, self.project, self.agent)

        async def plan(_: int) -> Plan[None]:
            await check_keys_enabled(self.store, *where)
            await guard()
            records, policies = replace_key(where, name, old, new)
            return Plan(None, records=records, policies=policies)

        revision, _ = await commit(self.store, self.env, plan)
        return revision


def _secret_response(
    key: str, record: ApiKey, revision: int, state: Propagation, status: int
) -> web.Response:
    """The one answer that carries a key: no cache may keep it."""
    view = ApiKeySecretView(
        name=record.name,
        key=key,
        masked=record.masked,
        created_at=record.created_at,
        expires_at=record.expires_at,
        revision=revision,
        propagation=state,
    )
    response = json_response(view, status)
    response.headers["Cache-Control"] = "no-store"
    return response


async def post_api_key(request: web.Request, body: ApiKeyBody) -> web.StreamResponse:
    target = _Target(request)
    wait_s = WAIT.parse(request, 0.0)
    expires = parse_expiry(body.expires_at) if body.expires_at is not None else None
    await target.check(request)
    key, record = mint(body.name, expires)

    async def absent() -> None:
        found = await _read_key(
            target.store, target.env, target.project, target.agent, body.name
        )
        if found is not None:
            raise Conflict(
                "api_key_exists",
                f"API key {body.name!r} already exists for "
                f"{target.project}/{target.agent} in {target.env!r}",
            )

    revision = await target.commit(body.name, None, record, absent)
    state = await wait_for(target.store, target.env, revision, wait_s)
    return _secret_response(key, record, revision, state, 201)


async def list_api_keys(request: web.Request, _: None) -> web.StreamResponse:
    target = _Target(request)
    await target.check(request)
    prefix = apikey_record(target.env, target.project, target.agent, "")
    found = await target.store.scan(prefix)

    records = [msgspec.json.decode(raw, type=ApiKey) for raw in found.values()]
    views = [
        ApiKeyView(
            name=r.name,
            masked=r.masked,
            created_at=r.created_at,
            expires_at=r.expires_at,
        )
        for r in records
        if not r.hidden
    ]
    return json_response(ApiKeyList(api_keys=views))


def _unchanged(target: _Target, name: str, old: ApiKey) -> Guard:
    """A guard: the key is still the one read, so a racing change is not undone."""

    async def guard() -> None:
        current = await _read_key(
            target.store, target.env, target.project, target.agent, name
        )
        if current is None or current.hidden:
            raise NotFound("api key", name)
        if current.key_hash != old.key_hash:
            raise Conflict("concurrent_change", f"API key {name!r} changed; retry")

    return guard


async def rotate_api_key(request: web.Request, _: None) -> web.StreamResponse:
    target = _Target(request)
    name = name_param(request, "name")
    wait_s = WAIT.parse(request, 0.0)
    await target.check(request)
    old = await _load_key(target.store, target.env, target.project, target.agent, name)

    expires = expiry_epoch(old)
    if expires is not None and expires <= time.time():
        raise Conflict(
            "api_key_expired",
            f"API key {name!r} expired at {old.expires_at}; "
            "revoke it and create a new one",
        )
    key, record = mint(name, expires)

    revision = await target.commit(name, old, record, _unchanged(target, name, old))
    state = await wait_for(target.store, target.env, revision, wait_s)
    return _secret_response(key, record, revision, state, 200)


async def delete_api_key(request: web.Request, _: None) -> web.StreamResponse:
    target = _Target(request)
    name = name_param(request, "name")
    wait_s = WAIT.parse(request, 0.0)
    await target.check(request)
    old = await _load_key(target.store, target.env, target.project, target.agent, name)

    revision = await target.commit(name, old, None, _unchanged(target, name, old))
    state = await wait_for(target.store, target.env, revision, wait_s)
    return json_response(RevisionView(revision=revision, propagation=state))


_KEYS = "/projects/{project}/agents/{agent}/environments/{env}/api-keys"

routes: list[Route[Any]] = [
    Route(
        "POST",
        _KEYS,
        post_api_key,
        "Create an API key; its secret appears in this answer only",
        ApiKeyBody,
        {201: ApiKeySecretView},
        (WAIT,),
    ),
    Route(
        "GET",
        _KEYS,
        list_api_keys,
        "List an agent's API keys in an environment, without secrets",
        responses={200: ApiKeyList},
    ),
    Route(
        "POST",
        _KEYS + "/{name}/rotate",
        rotate_api_key,
        "Replace a key's secret; the old one stops working",
        responses={200: ApiKeySecretView},
        query=(WAIT,),
    ),
    Route(
        "DELETE",
        _KEYS + "/{name}",
        delete_api_key,
        "Revoke an API key",
        responses={200: RevisionView},
        query=(WAIT,),
    ),
]
