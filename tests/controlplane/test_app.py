"""Admin authentication and the error shape, across every kind of failure."""

from __future__ import annotations

import io

import pytest

from controlplane.app import MAX_BODY_BYTES
from tests.controlplane.conftest import Client, call

UNAUTHORIZED = {
    "error": "unauthorized",
    "message": "A valid admin token is required",
    "details": None,
}


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer wrong-token",
        "Bearer ",
        "Basic dGVzdC1hZG1pbi10b2tlbi0wMTIzNDU2Nzg5",
        "test-admin-token-0123456789",
        "Bearer test-admin-token-012345678",
        "Bearer test-admin-token-0123456789x",
    ],
)
async def test_admin_auth_refuses_missing_or_wrong_token(
    api: Client, authorization: str | None
) -> None:
    headers = {"Authorization": authorization or ""}
    for path in ("/environments", "/openapi.json", "/no-such-route"):
        async with api.get("/api/v1" + path, headers=headers) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"] == (
                'Bearer realm="agent-gateway-admin"'
            )
            assert await response.json() == UNAUTHORIZED


async def test_admin_auth_accepts_case_insensitive_scheme(api: Client) -> None:
    headers = {"Authorization": "bearer test-admin-token-0123456789"}
    status, body = await call(api, "GET", "/environments", headers=headers)
    assert (status, body) == (200, {"environments": []})


async def test_admin_auth_refuses_two_authorization_headers(api: Client) -> None:
    headers = [("Authorization", "Bearer test-admin-token-0123456789")] * 2
    async with api.get("/api/v1/environments", headers=headers) as response:
        assert response.status == 401


async def test_errors_unknown_route_is_404(api: Client) -> None:
    status, body = await call(api, "GET", "/nothing-here")
    assert status == 404
    assert body == {"error": "not_found", "message": "No such route", "details": None}


async def test_errors_wrong_method_is_405_with_allow(api: Client) -> None:
    async with api.patch("/api/v1/environments/dev") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "GET, PUT"
        assert await response.json() == {
            "error": "method_not_allowed",
            "message": "Method not allowed on this route",
            "details": {"allowed_methods": ["GET", "PUT"]},
        }


async def test_errors_body_not_json_is_400(api: Client) -> None:
    status, body = await call(api, "PUT", "/environments/dev", data=b"{not json")
    assert status == 400
    assert body == {
        "error": "invalid_json",
        "message": "The request body is not valid JSON",
        "details": None,
    }


async def test_errors_body_too_large_is_413(api: Client) -> None:
    data = io.BytesIO(b'{"gateway_url": "' + b"a" * MAX_BODY_BYTES + b'"}')
    status, body = await call(api, "PUT", "/environments/dev", data=data)
    assert status == 413
    assert body == {
        "error": "body_too_large",
        "message": "The request body is too large",
        "details": None,
    }
