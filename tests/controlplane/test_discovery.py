"""OpenID discovery against a small discovery server of the test's own."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.controlplane.conftest import Client, call

Server = Callable[..., Awaitable[TestServer]]


@pytest.fixture
async def issuer(aiohttp_server: Server) -> str:
    """An issuer at ``/realms/a`` whose discovery document names its keys."""

    async def document(request: web.Request) -> web.Response:
        base = f"http://{request.host}/realms/a"
        return web.json_response(
            {"issuer": base, "jwks_uri": f"{base}/certs", "token_endpoint": "x"}
        )

    async def broken(request: web.Request) -> web.Response:
        return web.Response(text="<html>not json</html>")

    async def huge(request: web.Request) -> web.Response:
        return web.Response(body=b" " * (300 * 1024) + b"{}")

    app = web.Application()
    app.router.add_get("/realms/a/.well-known/openid-configuration", document)
    app.router.add_get("/broken/.well-known/openid-configuration", broken)
    app.router.add_get("/huge/.well-known/openid-configuration", huge)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}"


@pytest.mark.parametrize(
    "path", ["/realms/a", "/realms/a/", "/realms/a/.well-known/openid-configuration"]
)
async def test_discover_answers_issuer_and_jwks_uri(
    api: Client, issuer: str, path: str
) -> None:
    status, answer = await call(
        api, "POST", "/identity-providers/discover", {"url": issuer + path}
    )
    assert (status, answer) == (
        200,
        {"issuer": f"{issuer}/realms/a", "jwks_uri": f"{issuer}/realms/a/certs"},
    )


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/missing", "answered HTTP 404"),
        ("/broken", "is not an OpenID discovery document"),
        ("/huge", "answered a document that is too large"),
    ],
)
async def test_discover_bad_document_is_422_naming_url(
    api: Client, issuer: str, path: str, reason: str
) -> None:
    status, answer = await call(
        api, "POST", "/identity-providers/discover", {"url": issuer + path}
    )
    assert status == 422
    assert answer == {
        "error": "validation_error",
        "message": f"$.url: {reason}",
        "details": {"field": "$.url", "in": "body"},
    }


@pytest.mark.parametrize(
    "body", [{"url": "not-a-url"}, {"url": "http://127.0.0.1:1"}, {}]
)
async def test_discover_unreachable_or_invalid_url_is_422(
    api: Client, body: Any
) -> None:
    status, answer = await call(api, "POST", "/identity-providers/discover", body)
    assert (status, answer["details"]) == (422, {"field": "$.url", "in": "body"})
