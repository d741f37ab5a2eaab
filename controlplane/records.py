"""The control plane's own documents in the store: keys, shapes, reading them.

Records are msgspec JSON documents under slash-separated keys. Times are RFC
3339 strings in UTC with second precision.
"""

from __future__ import annotations

import time
from typing import Any, TypeVar

import msgspec

from controlplane.errors import NotFound
from gateway.policy import EndpointAuth
from gateway.store import Store

__all__ = [
    "Agent",
    "Deployment",
    "Environment",
    "IdentityProvider",
    "Project",
    "agent_record",
    "deployment_record",
    "environment_record",
    "idp_record",
    "load",
    "project_record",
    "read",
    "rfc3339",
    "now",
]

R = TypeVar("R", bound=msgspec.Struct)


class Environment(msgspec.Struct, kw_only=True):
    """One gateway fleet; ``gateway_url`` builds invoke URLs."""

    name: str
    gateway_url: str
    created_at: str
    updated_at: str


class IdentityProvider(msgspec.Struct, kw_only=True):
    """An identity provider as configured, defaults filled in.

    ``revision`` is the environment revision that last changed it.
    """

    name: str
    issuer: str
    jwks_uri: str | None = None
    jwks: dict[str, Any] | None = None
    discovery: bool = False
    audiences: list[str]
    algorithms: list[str]
    clock_skew_s: float
    jwks_refresh_s: float
    revision: int
    created_at: str
    updated_at: str


class Project(msgspec.Struct, kw_only=True):
    """A group of agents."""

    name: str
    created_at: str


class Agent(msgspec.Struct, kw_only=True):
    """An agent service: where it listens and how long it may stay silent."""

    project: str
    name: str
    upstream_url: str
    timeout_s: float
    created_at: str
    updated_at: str


class Deployment(msgspec.Struct, kw_only=True):
    """The current deployment of an agent in one environment."""

    project: str
    agent: str
    environment: str
    revision: int
    endpoint_auth: EndpointAuth
    upstream_url: str
    timeout_s: float
    created_at: str


def environment_record(env: str) -> str:
    return f"environments/{env}"


def idp_record(env: str, idp: str) -> str:
    return f"identity-providers/{env}/{idp}"


def project_record(project: str) -> str:
    return f"projects/{project}"


def agent_record(project: str, agent: str) -> str:
    return f"agents/{project}/{agent}"


def deployment_record(project: str, agent: str, env: str) -> str:
    return f"deployments/{project}/{agent}/{env}"


def rfc3339(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def now() -> str:
    return rfc3339(time.time())


async def read(store: Store, key: str, kind: type[R]) -> tuple[R | None, bytes | None]:
    """A record and its raw bytes (for ``expect``), or ``(None, None)``."""
    raw = await store.get(key)
    if raw is None:
        return None, None
    return msgspec.json.decode(raw, type=kind), raw


async def load(store: Store, key: str, kind: type[R], label: str, name: str) -> R:
    """A record that must exist; 404 naming it otherwise."""
    record, _ = await read(store, key, kind)
    if record is None:
        raise NotFound(label, name)
    return record
