"""OpenID discovery against a small discovery server of the test's own."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from controlplane.discovery import WELL_KNOWN, discover
from controlplane.errors import ValidationFailed
from tests.controlplane.conftest import Client, call
from tests.fixtures.tls import Tls

Server = Callable[..., Awaitable[TestServer]]

CORP = "https://login.corp.example"


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

    async def impostor(request: web.Request) -> web.Response:
        keys = "https://attacker.example/jwks"
        return web.json_response({"issuer": CORP, "jwks_uri": keys})

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://{request.host}/realms/a{WELL_KNOWN}")

    app = web.Application()
    app.router.add_get(f"/realms/a{WELL_KNOWN}", document)
    app.router.add_get(f"/broken{WELL_KNOWN}", broken)
    app.router.add_get(f"/huge{WELL_KNOWN}", huge)
    app.router.add_get(f"/impostor{WELL_KNOWN}", impostor)
    app.router.add_get(f"/moved{WELL_KNOWN}", moved)
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
        ("/moved", "answered HTTP 302; redirects are not followed"),
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


async def test_discover_document_of_another_issuer_is_422(
    api: Client, issuer: str
) -> None:
    url = f"{issuer}/impostor{WELL_KNOWN}"
    status, answer = await call(
        api, "POST", "/identity-providers/discover", {"url": url}
    )
    assert (status, answer) == (
        422,
        {
            "error": "validation_error",
            "message": f"$.url: is the discovery document of '{issuer}/impostor' "
            f"but names the issuer '{CORP}'",
            "details": {"field": "$.url", "in": "body"},
        },
    )


async def test_discover_https_issuer_with_http_jwks_uri_is_refused(
    aiohttp_server: Server, tls: Tls
) -> None:
    async def document(request: web.Request) -> web.Response:
        host = f"127.0.0.1:{request.url.port}"
        keys = f"http://{host}/certs"
        return web.json_response({"issuer": f"https://{host}", "jwks_uri": keys})

    app = web.Application()
    app.router.add_get(WELL_KNOWN, document)
    server = await aiohttp_server(app, ssl=tls.server)
    connector = aiohttp.TCPConnector(ssl=tls.client)
    async with aiohttp.ClientSession(connector=connector) as session:
        with pytest.raises(ValidationFailed) as failure:
            await discover(session, f"https://127.0.0.1:{server.port}")
    assert (failure.value.field, failure.value.reason) == (
        "$.url",
        "names a plain http jwks_uri for an https issuer",
    )
