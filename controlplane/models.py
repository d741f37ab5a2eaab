"""Wire models of the REST API: what request bodies decode into, what answers say.

The same Structs decode request bodies and generate the OpenAPI document, so
the published schema is the one enforced. Rules a schema cannot express (a URL
is absolute, sections agree with ``type``) are checked by the functions at the
end, which name the field they reject.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

import msgspec
from yarl import URL

from controlplane.errors import ValidationFailed
from gateway.policy import NAME, ApiKeySettings, OAuthSettings

__all__ = [
    "ALGORITHMS",
    "NAME_PATTERN",
    "AgentBody",
    "ApiKeySectionBody",
    "DeploymentBody",
    "DeploymentView",
    "DiscoverBody",
    "DiscoverView",
    "EndpointAuthBody",
    "EndpointAuthView",
    "EnvironmentBody",
    "ErrorView",
    "GatewaysView",
    "IdentityProviderBody",
    "JwkSet",
    "Name",
    "OAuthSectionBody",
    "ProjectBody",
    "Propagation",
    "RevisionView",
    "WorkerView",
    "check_name",
    "check_url",
]

#: Names of environments, identity providers, projects, agents and keys. The
#: negative look-ahead stops ``$`` from accepting a trailing newline.
NAME_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?!\n)$"

Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN, max_length=63)]
Url = Annotated[str, msgspec.Meta(min_length=1, max_length=2048)]
Text = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]

#: An HTTP header field name (an RFC 9110 token).
HeaderName = Annotated[
    str, msgspec.Meta(pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}(?!\n)$")
]
#: A credential prefix such as ``Bearer``: visible ASCII without spaces, or empty.
HeaderPrefix = Annotated[str, msgspec.Meta(pattern=r"^[!-~]{0,64}(?!\n)$")]

Algorithm = Literal[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "EdDSA",
]  # fmt: skip
AuthType = Literal["oauth", "api_key", "none"]

#: The asymmetric JWS algorithms an identity provider may be limited to.
ALGORITHMS: tuple[Algorithm, ...] = get_args(Algorithm)


class ErrorView(msgspec.Struct, kw_only=True):
    """The one error shape of every failed call."""

    error: str
    message: str
    details: dict[str, Any] | None = None


class EnvironmentBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``PUT /environments/{env}``."""

    gateway_url: Url


class JwkSet(msgspec.Struct, kw_only=True):
    """An inline JWK set (RFC 7517); only public keys are accepted."""

    keys: Annotated[list[dict[str, Any]], msgspec.Meta(min_length=1, max_length=64)]


class IdentityProviderBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``PUT /environments/{env}/identity-providers/{idp}``.

    Exactly one key source: ``jwks_uri``, ``jwks`` or ``discovery: true``.
    """

    issuer: Url
    jwks_uri: Url | None = None
    jwks: JwkSet | None = None
    discovery: bool = False
    audiences: Annotated[list[Text], msgspec.Meta(max_length=64)] = []
    algorithms: Annotated[list[Algorithm], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: list(ALGORITHMS)
    )
    clock_skew_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 30.0
    jwks_refresh_s: Annotated[float, msgspec.Meta(ge=1, le=86400)] = 300.0


class DiscoverBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /identity-providers/discover``: an issuer or its document."""

    url: Url


class DiscoverView(msgspec.Struct, kw_only=True):
    """What an OpenID discovery document says about where keys are."""

    issuer: str
    jwks_uri: str


class ProjectBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``PUT /projects/{project}`` (no settings yet; may be empty)."""


class AgentBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``PUT /projects/{project}/agents/{agent}``."""

    upstream_url: Url
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 300.0


class OAuthSectionBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``endpoint_auth.oauth``: which identity providers, and how tokens arrive."""

    identity_providers: Annotated[list[Name], msgspec.Meta(min_length=1, max_length=32)]
    audiences: Annotated[list[Text], msgspec.Meta(max_length=64)] = []
    header_name: HeaderName = "Authorization"
    auth_header_prefix: HeaderPrefix = "Bearer"
    forward_token: bool = True


class ApiKeySectionBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``endpoint_auth.api_key``: where the key arrives."""

    header_name: HeaderName = "X-API-Key"


class EndpointAuthBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``endpoint_auth``: the one method, and at most its own section."""

    type: AuthType
    oauth: OAuthSectionBody | None = None
    api_key: ApiKeySectionBody | None = None


class DeploymentBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /projects/{project}/agents/{agent}/deployments``."""

    environment: Name
    endpoint_auth: EndpointAuthBody | None = None


class EndpointAuthView(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A deployment's endpoint auth with every default filled in."""

    type: AuthType
    oauth: OAuthSettings | None = None
    api_key: ApiKeySettings | None = None


class Propagation(msgspec.Struct, kw_only=True):
    """How far a revision has reached the environment's live gateway workers."""

    revision: int
    live: int
    applied: int
    pending: list[str]


class DeploymentView(msgspec.Struct, kw_only=True):
    """A deployment as answered: the record, where to call it, how far it got."""

    project: str
    agent: str
    environment: str
    revision: int
    invoke_url: str
    endpoint_auth: EndpointAuthView
    upstream_url: str
    timeout_s: float
    created_at: str
    propagation: Propagation


class RevisionView(msgspec.Struct, kw_only=True):
    """The answer to a removal that gateways enforce."""

    revision: int
    propagation: Propagation


class WorkerView(msgspec.Struct, kw_only=True):
    """A live gateway worker and the revision it has applied."""

    id: str
    host: str
    pid: int
    revision: int
    last_seen: str


class GatewaysView(msgspec.Struct, kw_only=True):
    """An environment's revision and its live workers."""

    revision: int
    workers: list[WorkerView]


def check_name(value: str, field: str, location: str = "path") -> str:
    """Return ``value`` if it is a valid resource name, else reject ``field``."""
    if NAME.fullmatch(value) is None:
        raise ValidationFailed(
            field,
            "must be 1-63 characters of a-z, 0-9 and '-', starting and "
            "ending with a letter or digit",
            location,
        )
    return value


def check_url(value: str, field: str, *, plain: bool = False) -> str:
    """Return ``value`` if it is an absolute http(s) URL, else reject ``field``.

    URLs are echoed in answers, so credentials in them are refused. ``plain``
    also refuses a query and a fragment, for base URLs that paths are added to.
    """
    # An issuer becomes an upstream header value and is compared with the
    # token's as an exact string: whitespace or a control character in it
    # would break both, and would be invisible to whoever reads it.
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValidationFailed(
            field, "must not contain whitespace or control characters"
        )
    try:
        url = URL(value)
    except ValueError:
        raise ValidationFailed(field, "is not a URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValidationFailed(field, "must be an absolute http or https URL")
    if url.user is not None or url.password is not None:
        raise ValidationFailed(field, "must not carry credentials")
    if plain and (url.query_string or url.fragment):
        raise ValidationFailed(field, "must have no query or fragment")
    return value
