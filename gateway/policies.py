"""The policies a worker enforces, in the form the hot path reads them.

Each change names the policy keys it wrote; :meth:`PolicyTable.apply` turns
exactly those keys into routes, API keys or identity-provider updates, in one
synchronous call. Nothing awaits in between, so a request sees the policies
before a change or after it, never a mixture, and an environment with many
agents pays only for what changed.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Protocol

import msgspec
import yarl
from multidict import MultiMapping

from gateway.apikeys import ApiKeyAuthenticator, ApiKeyTable
from gateway.auth import Authenticator, AuthFailure, Identity, NoAuth
from gateway.headers import REQUEST_DROP
from gateway.log import policy_log
from gateway.metrics import RouteMetrics
from gateway.policy import (
    NAME,
    AgentPolicy,
    ApiKeyPolicy,
    ApiKeySettings,
    IdentityProviderPolicy,
    decode_policy,
)
from gateway.upstream import Origin

__all__ = [
    "IdentityProviderSink",
    "PolicyTable",
    "Route",
    "Unavailable",
    "describe_writes",
]


class IdentityProviderSink(Protocol):
    """What the table needs of ``gateway.oauth.IdentityProviders``."""

    def apply(self, name: str, policy: IdentityProviderPolicy | None) -> None: ...


class Unavailable(Authenticator):
    """An authenticator that refuses every request: used to fail closed."""

    def __init__(self, message: str) -> None:
        self._failure = (503, "auth_unavailable", message)

    def check(self, headers: MultiMapping[str]) -> Identity:
        raise AuthFailure(*self._failure)


class Route:
    """One deployed agent, ready for the hot path."""

    __slots__ = (
        "agent",
        "authenticator",
        "base_path",
        "drop",
        "host_header",
        "metrics",
        "origin",
        "project",
        "revision",
        "timeout_s",
    )

    def __init__(self, policy: AgentPolicy, authenticator: Authenticator) -> None:
        upstream = yarl.URL(policy.upstream_url)
        self.project = policy.project
        self.agent = policy.agent
        self.base_path = upstream.raw_path
        # Connect plus response headers, and then each silence of a stream:
        # a stream may outlive timeout_s as long as it is never that silent.
        self.timeout_s = policy.timeout_s
        host = upstream.raw_host or ""
        self.origin = Origin(upstream.scheme, host, upstream.port or 80)
        port = "" if upstream.is_default_port() else f":{upstream.port}"
        self.host_header = (host if ":" not in host else f"[{host}]") + port
        self.revision = policy.revision
        self.authenticator = authenticator
        self.drop = REQUEST_DROP | authenticator.strip
        self.metrics = RouteMetrics.of(policy.project, policy.agent)


class PolicyTable:
    """Routes by (project, agent), live API keys, and the identity providers."""

    def __init__(self, idps: IdentityProviderSink | None) -> None:
        self.routes: dict[tuple[str, str], Route] = {}
        self.api_keys = ApiKeyTable()
        self.idps = idps
        self.revision = 0
        self.raw: dict[str, bytes] = {}

    def apply(self, revision: int, writes: Mapping[str, bytes | None]) -> None:
        """Apply one change (or a snapshot's difference) in one step."""
        for key, value in writes.items():
            self._apply_one(key, value)
            if value is None:
                self.raw.pop(key, None)
            else:
                self.raw[key] = value
        self.revision = revision

    def diff(self, policies: Mapping[str, bytes]) -> dict[str, bytes | None]:
        """The writes that turn the applied policies into ``policies``."""
        writes: dict[str, bytes | None] = {
            key: None for key in self.raw if key not in policies
        }
        for key, value in policies.items():
            if self.raw.get(key) != value:
                writes[key] = value
        return writes

    def _apply_one(self, key: str, value: bytes | None) -> None:
        kind, _, name = key.partition("/")
        policy = _decode(key, value)
        if kind == "agent":
            self._apply_agent(name, policy)
        elif kind == "apikey":
            self.api_keys.apply(
                name, policy if isinstance(policy, ApiKeyPolicy) else None
            )
        elif kind == "idp":
            self._apply_idp(name, policy)
        else:
            policy_log.warning("ignoring policy key of unknown kind: %s", key)

    def _apply_agent(self, name: str, policy: object) -> None:
        project, _, agent = name.partition("/")
        if not isinstance(policy, AgentPolicy):
            self.routes.pop((project, agent), None)
            return
        if NAME.fullmatch(project) is None or NAME.fullmatch(agent) is None:
            # The control plane writes no such key; served, it could answer
            # paths the routing of requests never checks names for.
            policy_log.error("policy agent/%s is not a project/agent name", name)
            self.routes.pop((project, agent), None)
            return
        self.routes[(project, agent)] = Route(policy, self._authenticator(policy))

    def _apply_idp(self, name: str, policy: object) -> None:
        if self.idps is None:
            return
        idp = policy if isinstance(policy, IdentityProviderPolicy) else None
        try:
            self.idps.apply(name, idp)
        except Exception:
            # Fail closed: the old keys may be the ones this change revokes.
            policy_log.exception("identity provider %s could not be applied", name)
            self.idps.apply(name, None)

    def _authenticator(self, policy: AgentPolicy) -> Authenticator:
        auth = policy.endpoint_auth
        if auth.type == "none":
            return NoAuth()
        if auth.type == "api_key":
            settings = auth.api_key or ApiKeySettings()
            return ApiKeyAuthenticator(
                settings, policy.project, policy.agent, self.api_keys
            )
        return self._oauth_authenticator(policy)

    def _oauth_authenticator(self, policy: AgentPolicy) -> Authenticator:
        # Fail closed: a route whose OAuth validation cannot be built answers
        # 503 to every caller rather than letting anyone through.
        settings = policy.endpoint_auth.oauth
        try:
            oauth: Any = importlib.import_module("gateway.oauth")
            if settings is None or self.idps is None:
                raise ValueError("no OAuth settings or identity providers")
            built: Authenticator = oauth.OAuthAuthenticator(settings, self.idps)
            return built
        except Exception:
            policy_log.exception(
                "OAuth for %s/%s unavailable", policy.project, policy.agent
            )
            return Unavailable("Token validation is unavailable")


def _decode(key: str, value: bytes | None) -> object:
    """The policy stored under a key; None for a removal or a broken document."""
    if value is None:
        return None
    try:
        return decode_policy(key, value)
    except (msgspec.DecodeError, KeyError):
        # A document this worker cannot read is treated as absent: the agent
        # is not served rather than served with a guessed policy.
        policy_log.error("policy %s is malformed; treating it as absent", key)
        return None


def describe_writes(writes: Mapping[str, bytes | None], limit: int = 10) -> str:
    """A log-friendly summary of a change; API-key hashes are only counted."""
    named = [key for key in writes if not key.startswith("apikey/")]
    parts = [
        f"{key} {'removed' if writes[key] is None else 'set'}" for key in named[:limit]
    ]
    if len(named) > limit:
        parts.append(f"{len(named) - limit} more")
    if len(writes) > len(named):
        parts.append(f"{len(writes) - len(named)} api key(s) changed")
    return ", ".join(parts) or "no policy changes"
