"""Admin authentication: every call carries ``Authorization: Bearer <admin token>``."""

from __future__ import annotations

import hmac
from typing import Any

from aiohttp import web

from controlplane.errors import Unauthorized
from controlplane.state import SETTINGS

__all__ = ["admin_auth_middleware"]


def _presented(request: web.Request) -> bytes | None:
    values = request.headers.getall("Authorization", [])
    if len(values) != 1:
        return None
    scheme, _, token = values[0].partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip().encode("utf-8", "surrogateescape")


@web.middleware
async def admin_auth_middleware(
    request: web.Request, handler: Any
) -> web.StreamResponse:
    """Refuse any call without the admin token, before anything else runs."""
    expected = request.app[SETTINGS].admin_token.encode("utf-8", "surrogateescape")
    presented = _presented(request)

    # compare_digest keeps the comparison time independent of where they differ.
    if presented is None or not hmac.compare_digest(presented, expected):
        raise Unauthorized()
    response: web.StreamResponse = await handler(request)
    return response
