"""Environments: create, update, read, list, and the rules on names and URLs."""

from __future__ import annotations

import pytest

from tests.controlplane.conftest import TIME, Client, call


async def test_environment_put_creates_then_updates(api: Client) -> None:
    body = {"gateway_url": "https://gw.example.com/"}
    status, created = await call(api, "PUT", "/environments/prod", body)
    assert status == 201
    assert created == {
        "name": "prod",
        "gateway_url": "https://gw.example.com",
        "created_at": TIME,
        "updated_at": TIME,
    }

    body = {"gateway_url": "http://127.0.0.1:8080"}
    status, updated = await call(api, "PUT", "/environments/prod", body)
    assert status == 200
    assert updated["gateway_url"] == "http://127.0.0.1:8080"
    assert updated["created_at"] == created["created_at"]


async def test_environment_list_and_read(api: Client) -> None:
    for name in ("prod", "dev"):
        await call(api, "PUT", f"/environments/{name}", {"gateway_url": "http://g"})

    status, listed = await call(api, "GET", "/environments")
    assert status == 200
    assert [e["name"] for e in listed["environments"]] == ["dev", "prod"]

    status, read = await call(api, "GET", "/environments/dev")
    assert (status, read) == (200, listed["environments"][0])


async def test_environment_unknown_is_404(api: Client) -> None:
    status, body = await call(api, "GET", "/environments/nope")
    assert status == 404
    assert body == {
        "error": "not_found",
        "message": "environment 'nope' does not exist",
        "details": {"kind": "environment", "name": "nope"},
    }


@pytest.mark.parametrize(
    "name", ["Prod", "-dev", "dev-", "a" * 64, "dev_1", "d%C3%A9v", "dev%0A"]
)
async def test_environment_bad_name_is_422_naming_the_path_parameter(
    api: Client, name: str
) -> None:
    status, body = await call(
        api, "PUT", f"/environments/{name}", {"gateway_url": "http://g"}
    )
    assert status == 422
    assert body["error"] == "validation_error"
    assert body["details"] == {"field": "env", "in": "path"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "$.gateway_url"),
        ({"gateway_url": 5}, "$.gateway_url"),
        ({"gateway_url": "gw.example.com"}, "$.gateway_url"),
        ({"gateway_url": "ftp://gw.example.com"}, "$.gateway_url"),
        ({"gateway_url": "https://user:pw@gw.example.com"}, "$.gateway_url"),
        ({"gateway_url": "https://gw.example.com/?a=1"}, "$.gateway_url"),
        ({"gateway_url": "http://g", "extra": 1}, "$.extra"),
    ],
)
async def test_environment_bad_body_is_422_naming_the_field(
    api: Client, body: object, field: str
) -> None:
    status, answer = await call(api, "PUT", "/environments/dev", body)
    assert status == 422
    assert answer["error"] == "validation_error"
    assert answer["details"] == {"field": field, "in": "body"}
    assert answer["message"].startswith(f"{field}: ")
