"""Projects and agents: create, update, read, list, and their rules."""

from __future__ import annotations

import pytest

from gateway.store import Store
from tests.controlplane.conftest import TIME, Client, call


async def test_project_put_creates_once(api: Client) -> None:
    status, created = await call(api, "PUT", "/projects/shop")
    assert (status, created) == (201, {"name": "shop", "created_at": TIME})
    assert await call(api, "PUT", "/projects/shop", {}) == (200, created)
    assert await call(api, "GET", "/projects/shop") == (200, created)
    assert await call(api, "GET", "/projects") == (200, {"projects": [created]})


async def test_project_unknown_is_404(api: Client) -> None:
    status, body = await call(api, "GET", "/projects/nope/agents")
    assert (status, body["details"]) == (404, {"kind": "project", "name": "nope"})
    status, _ = await call(
        api, "PUT", "/projects/nope/agents/a", {"upstream_url": "http://u"}
    )
    assert status == 404


async def test_agent_put_defaults_updates_lists_and_reads(
    api: Client, store: Store
) -> None:
    await call(api, "PUT", "/projects/shop", {})
    path = "/projects/shop/agents/helper"
    status, created = await call(
        api, "PUT", path, {"upstream_url": "http://10.0.0.5:9000/"}
    )
    assert status == 201
    assert created == {
        "project": "shop",
        "name": "helper",
        "upstream_url": "http://10.0.0.5:9000",
        "timeout_s": 300.0,
        "created_at": TIME,
        "updated_at": TIME,
    }

    body = {"upstream_url": "http://10.0.0.6:9000/v1", "timeout_s": 30}
    status, updated = await call(api, "PUT", path, body)
    assert status == 200
    assert (updated["upstream_url"], updated["timeout_s"]) == (
        "http://10.0.0.6:9000/v1",
        30.0,
    )
    assert updated["created_at"] == created["created_at"]

    assert await call(api, "GET", path) == (200, updated)
    assert await call(api, "GET", "/projects/shop/agents") == (
        200,
        {"agents": [updated]},
    )
    assert await call(api, "GET", "/projects/shop/agents/other") == (
        404,
        {
            "error": "not_found",
            "message": "agent 'other' does not exist",
            "details": {"kind": "agent", "name": "other"},
        },
    )
    # Agent settings are not gateway policies until deployed.
    assert await store.revision("dev") == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "$.upstream_url"),
        ({"upstream_url": "localhost:9000"}, "$.upstream_url"),
        ({"upstream_url": "http://u", "timeout_s": 0}, "$.timeout_s"),
        ({"upstream_url": "http://u", "timeout_s": 3601}, "$.timeout_s"),
        ({"upstream_url": "http://u", "timeout_s": "5"}, "$.timeout_s"),
    ],
)
async def test_agent_bad_body_is_422_naming_the_field(
    api: Client, body: object, field: str
) -> None:
    await call(api, "PUT", "/projects/shop", {})
    status, answer = await call(api, "PUT", "/projects/shop/agents/helper", body)
    assert (status, answer["details"]) == (422, {"field": field, "in": "body"})


async def test_agent_bad_name_is_422_naming_the_path_parameter(api: Client) -> None:
    await call(api, "PUT", "/projects/shop", {})
    status, answer = await call(
        api, "PUT", "/projects/shop/agents/Helper", {"upstream_url": "http://u"}
    )
    assert (status, answer["details"]) == (422, {"field": "agent", "in": "path"})
