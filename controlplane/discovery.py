"""OpenID Connect discovery: where an issuer publishes its signing keys."""

from __future__ import annotations

import aiohttp
import msgspec
from yarl import URL

from controlplane.errors import ValidationFailed
from controlplane.models import DiscoverView, check_url

__all__ = ["WELL_KNOWN", "discover", "discovery_url"]

WELL_KNOWN = "/.well-known/openid-configuration"

#: A discovery document is a few KiB; anything far larger is not one.
_MAX_BYTES = 256 * 1024
_TIMEOUT = aiohttp.ClientTimeout(total=5)


class _Document(msgspec.Struct):
    """The two members of a discovery document (RFC 8414) that matter here."""

    issuer: str
    jwks_uri: str


def discovery_url(url: str) -> str:
    """The discovery document of an issuer, or ``url`` if it already is one."""
    if URL(url).path.endswith(WELL_KNOWN):
        return url
    return url.rstrip("/") + WELL_KNOWN


async def discover(session: aiohttp.ClientSession, url: str) -> DiscoverView:
    """Fetch and read a discovery document; 422 naming ``url`` when impossible.

    The document must belong to the issuer it names (OpenID Connect
    Discovery 1.0 §4.3): that issuer's discovery URL is the one fetched, so
    the answer is what the gateway accepts when it discovers keys itself.
    """
    check_url(url, "$.url")
    location = discovery_url(url)
    try:
        document = msgspec.json.decode(await _fetch(session, location), type=_Document)
    except msgspec.DecodeError:
        raise _bad_url("is not an OpenID discovery document") from None
    _check_document(document, location)
    return DiscoverView(issuer=document.issuer, jwks_uri=document.jwks_uri)


def _check_document(document: _Document, location: str) -> None:
    for value in (document.issuer, document.jwks_uri):
        try:
            check_url(value, "$.url")
        except ValidationFailed:
            raise _bad_url("names an issuer or jwks_uri that is not a URL") from None
    # The gateway finds an issuer's document at exactly this URL.
    if document.issuer.rstrip("/") + WELL_KNOWN != location:
        issuer = location.removesuffix(WELL_KNOWN)
        raise _bad_url(
            f"is the discovery document of {issuer!r} "
            f"but names the issuer {document.issuer!r}"
        )
    schemes = URL(document.issuer).scheme, URL(document.jwks_uri).scheme
    if schemes == ("https", "http"):
        raise _bad_url("names a plain http jwks_uri for an https issuer")


async def _fetch(session: aiohttp.ClientSession, url: str) -> bytes:
    try:
        async with session.get(
            url, timeout=_TIMEOUT, allow_redirects=False
        ) as response:
            if 300 <= response.status < 400:
                raise _bad_url(
                    f"answered HTTP {response.status}; redirects are not followed"
                )
            if response.status != 200:
                raise _bad_url(f"answered HTTP {response.status}")
            return await _read_capped(response)
    except (TimeoutError, aiohttp.ClientError, ValueError):
        raise _bad_url("could not be fetched") from None


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > _MAX_BYTES:
            raise _bad_url("answered a document that is too large")
        chunks.append(chunk)
    return b"".join(chunks)


def _bad_url(reason: str) -> ValidationFailed:
    return ValidationFailed("$.url", reason)
