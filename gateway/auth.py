"""Endpoint authentication as the proxy sees it: one authenticator per route.

An authenticator is built once, when a policy is applied, and called for
every request of its route. It either returns the identity headers to add
upstream or raises :class:`AuthFailure`, which carries the full answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping

from multidict import MultiMapping

__all__ = [
    "IDENTITY_HEADERS",
    "NO_IDENTITY",
    "AuthFailure",
    "Authenticator",
    "Identity",
    "NoAuth",
]

#: Request headers only the gateway may set; any copy a caller sends is removed.
IDENTITY_HEADERS = frozenset(
    {
        "x-auth-subject",
        "x-auth-issuer",
        "x-auth-identity-provider",
        "x-auth-api-key-name",
    }
)


class AuthFailure(Exception):
    """A request that authentication refuses; carries the exact answer."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.headers = dict(headers or {})


class Identity:
    """Headers the gateway adds upstream for an authenticated caller.

    ``lines`` is their wire form, built once when the identity is made (a
    verified token or an API key is reused by many requests); it is None
    when a value cannot go on a header line, which the proxy refuses.
    """

    __slots__ = ("headers", "lines")

    def __init__(
        self, headers: tuple[tuple[str, str], ...] = (), lines: str | None = None
    ) -> None:
        # ``lines`` only from a caller that checked every value itself.
        self.headers = headers
        self.lines = _header_lines(headers) if lines is None else lines


def _header_lines(headers: tuple[tuple[str, str], ...]) -> str | None:
    for _, value in headers:
        # Claims come from tokens: a line break there would forge headers.
        if "\r" in value or "\n" in value or "\x00" in value:
            return None
    return "".join(f"{name}: {value}\r\n" for name, value in headers)


NO_IDENTITY = Identity()


class Authenticator:
    """Checks one request's credentials for one route.

    ``strip`` holds the lower-case names of request headers that never go
    upstream for this route (credential headers that are not forwarded, and
    every identity header the gateway sets, so a caller cannot spoof them).

    :meth:`check` answers at once when it can (no credentials, an API key, a
    token verified before) and returns an awaitable only when it must wait,
    for keys being fetched or a signature to verify: most requests then cost
    no coroutine. Refusals raise :class:`AuthFailure`, at once or on await.
    """

    strip: frozenset[str] = IDENTITY_HEADERS

    def check(self, headers: MultiMapping[str]) -> Identity | Awaitable[Identity]:
        raise NotImplementedError

    async def authenticate(self, headers: MultiMapping[str]) -> Identity:
        """:meth:`check`, awaited when it has to be."""
        result = self.check(headers)
        if isinstance(result, Identity):
            return result
        return await result


class NoAuth(Authenticator):
    """Endpoint authentication ``none``."""

    def check(self, headers: MultiMapping[str]) -> Identity:
        return NO_IDENTITY
