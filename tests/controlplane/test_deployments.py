"""Deployments: endpoint-auth rules, the agent policy, revisions and propagation."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from gateway.policy import (
    AgentPolicy,
    ApiKeySettings,
    EndpointAuth,
    OAuthSettings,
    decode_policy,
)
from gateway.store import Store, WorkerInfo
from tests.controlplane.conftest import TIME, Client, add_idp, call, setup_agent

DEPLOY = "/projects/shop/agents/helper/deployments"
CURRENT = DEPLOY + "/dev"
NO_WORKERS = {"live": 0, "applied": 0, "pending": []}
OAUTH_DEFAULTS = {
    "audiences": [],
    "header_name": "Authorization",
    "auth_header_prefix": "Bearer",
    "forward_token": True,
}


@pytest.fixture
async def ready(api: Client) -> Client:
    await setup_agent(api)
    return api


def oauth(*idps: str, **extra: Any) -> dict[str, Any]:
    return {"type": "oauth", "oauth": {"identity_providers": list(idps), **extra}}


async def deploy(api: Client, auth: object = None, query: str = "") -> tuple[int, Any]:
    body: dict[str, Any] = {"environment": "dev"}
    if auth is not None:
        body["endpoint_auth"] = auth
    return await call(api, "POST", DEPLOY + query, body)


async def test_deployment_first_without_endpoint_auth_is_api_key(
    ready: Client, store: Store
) -> None:
    status, answer = await deploy(ready)
    assert status == 201
    assert answer == {
        "project": "shop",
        "agent": "helper",
        "environment": "dev",
        "revision": 1,
        "invoke_url": "https://gw.example.com/shop/helper",
        "endpoint_auth": {"type": "api_key", "api_key": {"header_name": "X-API-Key"}},
        "upstream_url": "http://127.0.0.1:9100",
        "timeout_s": 300.0,
        "created_at": TIME,
        "propagation": {"revision": 1, **NO_WORKERS},
    }
    assert await call(ready, "GET", CURRENT) == (200, answer)

    snapshot = await store.snapshot("dev")
    assert decode_policy(
        "agent/shop/helper", snapshot.policies["agent/shop/helper"]
    ) == (
        AgentPolicy(
            project="shop",
            agent="helper",
            upstream_url="http://127.0.0.1:9100",
            timeout_s=300.0,
            endpoint_auth=EndpointAuth(type="api_key", api_key=ApiKeySettings()),
            revision=1,
        )
    )


async def test_deployment_oauth_fills_defaults_and_compiles_policy(
    ready: Client, store: Store
) -> None:
    await add_idp(ready, name="corp")
    await add_idp(ready, name="partner")

    status, answer = await deploy(ready, oauth("corp", "partner", forward_token=False))
    assert status == 201
    assert answer["revision"] == 3
    assert answer["endpoint_auth"] == {
        "type": "oauth",
        "oauth": {
            **OAUTH_DEFAULTS,
            "identity_providers": ["corp", "partner"],
            "forward_token": False,
        },
    }
    policy = decode_policy(
        "agent/shop/helper", (await store.snapshot("dev")).policies["agent/shop/helper"]
    )
    assert isinstance(policy, AgentPolicy)
    assert policy.endpoint_auth == EndpointAuth(
        type="oauth",
        oauth=OAuthSettings(
            identity_providers=["corp", "partner"], forward_token=False
        ),
    )


async def test_deployment_redeploy_without_endpoint_auth_keeps_current(
    ready: Client,
) -> None:
    await add_idp(ready)
    first = (await deploy(ready, oauth("corp", audiences=["api"])))[1]

    status, again = await deploy(ready)
    assert status == 201
    assert again["revision"] == first["revision"] + 1
    assert again["endpoint_auth"] == first["endpoint_auth"]


async def test_deployment_none_and_changing_method(ready: Client) -> None:
    status, answer = await deploy(ready, {"type": "none"})
    assert (status, answer["endpoint_auth"]) == (201, {"type": "none"})

    auth = {"type": "api_key", "api_key": {"header_name": "X-Agent-Key"}}
    status, answer = await deploy(ready, auth)
    assert (status, answer["endpoint_auth"]) == (201, auth)


EA = "$.endpoint_auth"
OAUTH = f"{EA}.oauth"


def corp(**fields: Any) -> dict[str, Any]:
    return {"identity_providers": ["corp"], **fields}


_BAD: list[tuple[object, str]] = [
    ({"type": "oauth", "oauth": corp(), "api_key": {}}, EA),
    ({"type": "api_key", "oauth": corp()}, OAUTH),
    ({"type": "oauth", "api_key": {}}, f"{EA}.api_key"),
    ({"type": "none", "api_key": {}}, f"{EA}.api_key"),
    ({"type": "oauth"}, f"{OAUTH}.identity_providers"),
    (
        {"type": "oauth", "oauth": {"identity_providers": []}},
        f"{OAUTH}.identity_providers",
    ),
    (oauth("Corp"), f"{OAUTH}.identity_providers[0]"),
    ({"type": "oauth", "oauth": corp(audiences=[7])}, f"{OAUTH}.audiences[0]"),
    (
        {"type": "oauth", "oauth": corp(header_name="Bad Header")},
        f"{OAUTH}.header_name",
    ),
    ({"type": "oauth", "oauth": corp(forward_token="yes")}, f"{OAUTH}.forward_token"),
    ({"type": "basic"}, f"{EA}.type"),
    ({"type": "api_key", "api_key": {"header": "X"}}, f"{EA}.api_key.header"),
]


@pytest.mark.parametrize(("auth", "field"), _BAD)
async def test_deployment_bad_endpoint_auth_is_422_naming_the_field(
    ready: Client, store: Store, auth: object, field: str
) -> None:
    await add_idp(ready)
    status, answer = await deploy(ready, auth)
    assert status == 422
    assert answer["error"] == "validation_error"
    assert answer["details"] == {"field": field, "in": "body"}
    assert await store.revision("dev") == 1


async def test_deployment_unknown_identity_providers_are_422_naming_them(
    ready: Client,
) -> None:
    await add_idp(ready, name="corp")
    await call(ready, "PUT", "/environments/prod", {"gateway_url": "http://p"})
    await add_idp(ready, env="prod", name="prod-idp")

    status, answer = await deploy(ready, oauth("corp", "prod-idp", "ghost"))
    assert status == 422
    assert answer == {
        "error": "validation_error",
        "message": "$.endpoint_auth.oauth.identity_providers[1]: not an identity "
        "provider of environment 'dev': prod-idp, ghost",
        "details": {
            "field": "$.endpoint_auth.oauth.identity_providers[1]",
            "in": "body",
            "unknown": ["prod-idp", "ghost"],
        },
    }


async def test_deployment_two_identity_providers_of_one_issuer_is_422(
    ready: Client, store: Store
) -> None:
    corp = {"issuer": "https://corp.example.com", "discovery": True}
    for name in ("corp-old", "other", "corp-new"):
        body = corp if name != "other" else {**corp, "issuer": "https://o.example"}
        path = f"/environments/dev/identity-providers/{name}"
        assert (await call(ready, "PUT", path, body))[0] == 201
    revision = await store.revision("dev")

    status, answer = await deploy(ready, oauth("corp-old", "other", "corp-new"))
    assert (status, answer) == (
        422,
        {
            "error": "validation_error",
            "message": "$.endpoint_auth.oauth.identity_providers[2]: identity "
            "providers 'corp-old' and 'corp-new' have the same issuer "
            "'https://corp.example.com'; select one of them",
            "details": {
                "field": "$.endpoint_auth.oauth.identity_providers[2]",
                "in": "body",
                "identity_providers": ["corp-old", "corp-new"],
            },
        },
    )
    assert await store.revision("dev") == revision
    assert (await call(ready, "GET", CURRENT))[0] == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "$.environment"),
        ({"environment": "Dev"}, "$.environment"),
        ({"environment": "dev", "extra": True}, "$.extra"),
    ],
)
async def test_deployment_bad_body_is_422(
    ready: Client, body: object, field: str
) -> None:
    status, answer = await call(ready, "POST", DEPLOY, body)
    assert (status, answer["details"]) == (422, {"field": field, "in": "body"})


async def test_deployment_not_json_is_400(ready: Client) -> None:
    status, answer = await call(ready, "POST", DEPLOY, data=b"environment=dev")
    assert (status, answer["error"]) == (400, "invalid_json")


@pytest.mark.parametrize("wait", ["31", "-1", "soon", "nan"])
async def test_deployment_bad_wait_is_422_naming_it(ready: Client, wait: str) -> None:
    status, answer = await deploy(ready, query=f"?wait={wait}")
    assert (status, answer["details"]) == (422, {"field": "wait", "in": "query"})


@pytest.mark.parametrize(
    ("path", "body", "kind"),
    [
        ("/projects/nope/agents/helper/deployments", {"environment": "dev"}, "project"),
        ("/projects/shop/agents/nope/deployments", {"environment": "dev"}, "agent"),
        (DEPLOY, {"environment": "nope"}, "environment"),
    ],
)
async def test_deployment_unknown_resource_is_404(
    ready: Client, path: str, body: object, kind: str
) -> None:
    status, answer = await call(ready, "POST", path, body)
    assert (status, answer["details"]["kind"]) == (404, kind)


async def test_deployment_undeploy_removes_record_and_policy(
    ready: Client, store: Store
) -> None:
    await deploy(ready)
    status, answer = await call(ready, "DELETE", CURRENT)
    assert (status, answer) == (
        200,
        {"revision": 2, "propagation": {"revision": 2, **NO_WORKERS}},
    )
    assert (await store.snapshot("dev")).policies == {}

    status, answer = await call(ready, "GET", CURRENT)
    assert (status, answer["details"]) == (
        404,
        {"kind": "deployment", "name": "shop/helper in dev"},
    )
    assert (await call(ready, "DELETE", CURRENT))[0] == 404
    assert await store.revision("dev") == 2


async def test_deployment_revisions_increase_by_one_per_change(
    ready: Client, store: Store
) -> None:
    revisions = [await add_idp(ready)]
    revisions.append((await deploy(ready, oauth("corp")))[1]["revision"])
    revisions.append((await deploy(ready, {"type": "none"}))[1]["revision"])
    revisions.append((await call(ready, "DELETE", CURRENT))[1]["revision"])
    revisions.append(
        (await call(ready, "DELETE", "/environments/dev/identity-providers/corp"))[1][
            "revision"
        ]
    )
    assert revisions == [1, 2, 3, 4, 5]
    assert await store.revision("dev") == 5


async def test_deployment_concurrent_deploys_all_land_with_distinct_revisions(
    ready: Client, store: Store
) -> None:
    agents = [f"a{i}" for i in range(4)]
    for agent in agents:
        await setup_agent(ready, agent=agent)

    answers = await asyncio.gather(
        *(
            call(
                ready,
                "POST",
                f"/projects/shop/agents/{a}/deployments",
                {"environment": "dev"},
            )
            for a in agents
        )
    )
    assert [status for status, _ in answers] == [201] * 4
    assert sorted(answer["revision"] for _, answer in answers) == [1, 2, 3, 4]

    policies = (await store.snapshot("dev")).policies
    for _, answer in answers:
        policy = decode_policy(
            f"agent/shop/{answer['agent']}", policies[f"agent/shop/{answer['agent']}"]
        )
        assert isinstance(policy, AgentPolicy)
        assert policy.revision == answer["revision"]


def worker(name: str, revision: int) -> WorkerInfo:
    return WorkerInfo(
        id=name, host="h1", pid=4242, revision=revision, last_seen=time.time()
    )


async def follow_revisions(store: Store, name: str) -> None:
    """A stand-in gateway worker: reports whatever revision the store is at."""
    while True:
        await store.heartbeat("dev", worker(name, await store.revision("dev")), 30)
        await asyncio.sleep(0.005)


async def test_deployment_wait_returns_once_live_workers_applied(
    ready: Client, store: Store
) -> None:
    await store.heartbeat("dev", worker("w1", 0), 30)
    task = asyncio.create_task(follow_revisions(store, "w1"))
    try:
        status, answer = await deploy(ready, query="?wait=20")
    finally:
        task.cancel()
    assert status == 201
    assert answer["propagation"] == {
        "revision": 1,
        "live": 1,
        "applied": 1,
        "pending": [],
    }


async def test_deployment_wait_deadline_names_pending_workers(
    ready: Client, store: Store
) -> None:
    await store.heartbeat("dev", worker("w-stuck", 0), 30)
    await store.heartbeat("dev", worker("w-ahead", 99), 30)

    status, answer = await deploy(ready, query="?wait=0.1")
    assert status == 201
    assert answer["propagation"] == {
        "revision": 1,
        "live": 2,
        "applied": 1,
        "pending": ["w-stuck"],
    }
