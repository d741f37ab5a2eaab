"""API keys at the gateway: the live-key table and the ``api_key`` authenticator."""

from __future__ import annotations

import time

from multidict import MultiMapping, istr

from gateway.auth import IDENTITY_HEADERS, Authenticator, AuthFailure, Identity
from gateway.policy import ApiKeyPolicy, ApiKeySettings, hash_api_key

__all__ = ["ApiKeyAuthenticator", "ApiKeyTable"]

_UNAUTHORIZED = ("unauthorized", "Valid API key required")
#: RFC 9110 asks every 401 to name a scheme; API keys have no registered
#: one, so the challenge names the header the key goes in.
_CHALLENGE = 'ApiKey realm="agent-gateway", header="{}"'


class _LiveKey:
    """A key as the hot path needs it, with its identity built once."""

    __slots__ = ("agent", "expires_at", "identity", "project")

    def __init__(self, policy: ApiKeyPolicy) -> None:
        self.project = policy.project
        self.agent = policy.agent
        self.expires_at = policy.expires_at
        self.identity = Identity((("X-Auth-Api-Key-Name", policy.name),))


class ApiKeyTable:
    """Every live API key of the environment, by the SHA-256 hex of the key."""

    def __init__(self) -> None:
        self._keys: dict[str, _LiveKey] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def apply(self, key_hash: str, policy: ApiKeyPolicy | None) -> None:
        """Install, replace or (with None) revoke one key."""
        if policy is None:
            self._keys.pop(key_hash, None)
        else:
            self._keys[key_hash] = _LiveKey(policy)

    def get(self, key_hash: str) -> _LiveKey | None:
        return self._keys.get(key_hash)


class ApiKeyAuthenticator(Authenticator):
    """Endpoint authentication ``api_key`` for one deployed agent.

    Looking a key up by its hash is safe against timing attacks: the time a
    dict lookup takes tells nothing useful about a 256-bit secret.
    """

    def __init__(
        self,
        settings: ApiKeySettings,
        project: str,
        agent: str,
        table: ApiKeyTable,
    ) -> None:
        # An istr: the lookup of every request skips lower-casing the name.
        self.header_name = istr(settings.header_name)
        self._challenge = {"WWW-Authenticate": _CHALLENGE.format(settings.header_name)}
        self.strip = IDENTITY_HEADERS | {settings.header_name.lower()}
        self._project = project
        self._agent = agent
        self._table = table

    def check(self, headers: MultiMapping[str]) -> Identity:
        values = headers.getall(self.header_name, ())
        if len(values) != 1:
            raise self._refusal(len(values))

        key = self._table.get(hash_api_key(values[0]))
        if key is None or key.project != self._project or key.agent != self._agent:
            raise AuthFailure(401, *_UNAUTHORIZED, self._challenge)
        if key.expires_at is not None and key.expires_at <= time.time():
            raise AuthFailure(401, *_UNAUTHORIZED, self._challenge)

        return key.identity

    def _refusal(self, count: int) -> AuthFailure:
        if count == 0:
            return AuthFailure(401, *_UNAUTHORIZED, self._challenge)
        return AuthFailure(
            400,
            "bad_request",
            f"Send exactly one {self.header_name} header",
        )
