"""Policies: what the control plane compiles and every gateway worker enforces.

A policy set belongs to one environment and is a flat map of policy keys to
msgpack-free JSON documents (encoded with msgspec). The keys are:

- ``agent/<project>/<agent>`` -> :class:`AgentPolicy`, one per deployed agent;
- ``idp/<name>`` -> :class:`IdentityProviderPolicy`, one per identity provider;
- ``apikey/<sha256 hex of the key>`` -> :class:`ApiKeyPolicy`, one per live key.

A key that is absent means "not deployed", "no such identity provider" or
"revoked". Each change the control plane commits names the keys it wrote and
their new values (``None`` for a removal), so a worker can apply it without
reading anything else.
"""

from __future__ import annotations

import hashlib
import re
from typing import Literal

import msgspec

__all__ = [
    "AgentPolicy",
    "ApiKeyPolicy",
    "ApiKeySettings",
    "EndpointAuth",
    "NAME",
    "IdentityProviderPolicy",
    "OAuthSettings",
    "agent_key",
    "apikey_key",
    "decode_policy",
    "encode_policy",
    "hash_api_key",
    "idp_key",
]

#: A name of an environment, identity provider, project, agent or key, for
#: ``fullmatch``: lower-case letters, digits and inner hyphens, 1 to 63.
NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")

AuthType = Literal["oauth", "api_key", "none"]


class OAuthSettings(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True
):
    """How an agent accepts OAuth bearer tokens."""

    identity_providers: list[str]
    audiences: list[str] = []
    header_name: str = "Authorization"
    auth_header_prefix: str = "Bearer"
    forward_token: bool = True


class ApiKeySettings(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True
):
    """How an agent accepts API keys."""

    header_name: str = "X-API-Key"


class EndpointAuth(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True
):
    """The one endpoint authentication method of a deployment."""

    type: AuthType
    oauth: OAuthSettings | None = None
    api_key: ApiKeySettings | None = None


class AgentPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """One deployed agent as the gateway enforces it."""

    project: str
    agent: str
    upstream_url: str
    timeout_s: float
    endpoint_auth: EndpointAuth
    revision: int


class IdentityProviderPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """An issuer whose tokens the environment's gateways can accept.

    Exactly one key source is set: ``jwks_uri``, ``jwks`` (an inline JWK set)
    or ``discovery`` (the gateway resolves ``jwks_uri`` from the issuer's
    ``/.well-known/openid-configuration``).
    """

    name: str
    issuer: str
    jwks_uri: str | None = None
    jwks: dict[str, object] | None = None
    discovery: bool = False
    audiences: list[str] = []
    algorithms: list[str] = []
    clock_skew_s: float = 30.0
    jwks_refresh_s: float = 300.0


class ApiKeyPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """A live API key: which agent it opens, until when (epoch seconds)."""

    project: str
    agent: str
    name: str
    expires_at: float | None = None


def agent_key(project: str, agent: str) -> str:
    return f"agent/{project}/{agent}"


def idp_key(name: str) -> str:
    return f"idp/{name}"


def apikey_key(key_hash: str) -> str:
    return f"apikey/{key_hash}"


def hash_api_key(key: str) -> str:
    """The stored form of an API key.

    A plain SHA-256 is enough: keys carry 256 bits from a CSPRNG, so there is
    nothing for a slow hash to protect against, and the gateway hashes every
    presented key on the hot path.
    """
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


_encoder = msgspec.json.Encoder()


def encode_policy(policy: msgspec.Struct) -> bytes:
    return _encoder.encode(policy)


_decoders: dict[str, msgspec.json.Decoder[object]] = {
    "agent": msgspec.json.Decoder(AgentPolicy),
    "idp": msgspec.json.Decoder(IdentityProviderPolicy),
    "apikey": msgspec.json.Decoder(ApiKeyPolicy),
}


def decode_policy(key: str, value: bytes) -> object:
    """Decode the document stored under a policy key; the prefix picks the type."""
    kind = key.partition("/")[0]
    return _decoders[kind].decode(value)
