"""Admin authentication and the error shape, across every kind of failure."""

from __future__ import annotations

import asyncio
import io
import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from controlplane.app import MAX_BODY_BYTES
from tests.controlplane.conftest import Client, call
from tests.fixtures.stack import ControlPlaneProcess

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


# -- malformed HTTP, on the real server ------------------------------------------


def _exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes and read the answer until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def _json_answer(answer: bytes) -> tuple[bytes, dict[bytes, bytes], object]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = dict(line.lower().split(b": ", 1) for line in lines)
    return status, headers, json.loads(body)


@pytest.mark.parametrize(
    ("request_bytes", "status", "body"),
    [
        (
            b"GET /api/v1/environments HTTP/1.1\r\nHost: cp\r\n"
            b"Authorization: Bearer %(token)s" + b"a" * 9000 + b"\r\n\r\n",
            b"HTTP/1.0 431 Request Header Fields Too Large",
            {
                "error": "header_too_large",
                "message": "A request header line is longer than the API accepts",
                "details": None,
            },
        ),
        (
            b"GET /api/v1/environments HTTP/1.1\r\nHost: cp\r\n"
            b"Authorization: Bearer %(token)s\r\nContent-Length: x%(token)s\r\n\r\n",
            b"HTTP/1.0 400 Bad Request",
            {
                "error": "bad_request",
                "message": "Malformed HTTP request",
                "details": None,
            },
        ),
        (
            b"G\x01T /%(token)s HTTP/1.1\r\nHost: cp\r\n\r\n",
            b"HTTP/1.0 400 Bad Request",
            {
                "error": "bad_request",
                "message": "Malformed HTTP request",
                "details": None,
            },
        ),
    ],
)
async def test_errors_malformed_http_answered_in_shape_without_echo(
    controlplane_factory: Callable[[str], Awaitable[ControlPlaneProcess]],
    embedded_path: Path,
    request_bytes: bytes,
    status: bytes,
    body: object,
) -> None:
    controlplane = await controlplane_factory(str(embedded_path))
    token = controlplane.token.encode()

    answer = await asyncio.to_thread(
        _exchange, controlplane.port, request_bytes % {b"token": token}
    )

    assert _json_answer(answer)[::2] == (status, body)
    assert _json_answer(answer)[1][b"content-type"] == b"application/json"
    assert token not in answer
    assert controlplane.token not in controlplane.log()
    assert "Traceback" not in controlplane.log()
    # And the server keeps serving.
    fine = await asyncio.to_thread(
        _exchange,
        controlplane.port,
        b"GET /api/v1/environments HTTP/1.1\r\nHost: cp\r\nConnection: close\r\n"
        b"Authorization: Bearer %s\r\n\r\n" % token,
    )
    assert _json_answer(fine)[::2] == (b"HTTP/1.1 200 OK", {"environments": []})
