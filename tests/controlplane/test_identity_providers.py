"""Identity providers: the body rules, the idp policy they commit, deletion."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from controlplane.models import ALGORITHMS
from gateway.policy import IdentityProviderPolicy, decode_policy
from gateway.store import Store
from tests.controlplane.conftest import TIME, Client, add_idp, call, setup_agent

IDP = "/environments/dev/identity-providers/corp"
JWK = {"kty": "EC", "crv": "P-256", "x": "f83O", "y": "x_FE", "kid": "k1"}


@pytest.fixture
async def dev(api: Client) -> Client:
    await call(api, "PUT", "/environments/dev", {"gateway_url": "http://g"})
    return api


async def test_identity_provider_put_fills_defaults_and_commits_policy(
    dev: Client, store: Store
) -> None:
    body = {"issuer": "https://idp.example.com/realms/a", "discovery": True}
    status, answer = await call(dev, "PUT", IDP, body)
    assert status == 201
    assert answer == {
        "name": "corp",
        "issuer": "https://idp.example.com/realms/a",
        "jwks_uri": None,
        "jwks": None,
        "discovery": True,
        "audiences": [],
        "algorithms": list(ALGORITHMS),
        "clock_skew_s": 30.0,
        "jwks_refresh_s": 300.0,
        "revision": 1,
        "created_at": TIME,
        "updated_at": TIME,
    }

    snapshot = await store.snapshot("dev")
    assert snapshot.revision == 1
    assert decode_policy("idp/corp", snapshot.policies["idp/corp"]) == (
        IdentityProviderPolicy(
            name="corp",
            issuer="https://idp.example.com/realms/a",
            discovery=True,
            algorithms=list(ALGORITHMS),
        )
    )


async def test_identity_provider_update_list_read_delete(
    dev: Client, store: Store
) -> None:
    body = {
        "issuer": "https://idp.example.com",
        "jwks": {"keys": [JWK]},
        "audiences": ["agents-api"],
        "algorithms": ["ES256"],
        "clock_skew_s": 5,
        "jwks_refresh_s": 60,
    }
    assert (await call(dev, "PUT", IDP, body))[0] == 201
    status, updated = await call(dev, "PUT", IDP, body)
    assert (status, updated["revision"]) == (200, 2)
    assert updated["jwks"] == {"keys": [JWK]}

    status, listed = await call(dev, "GET", "/environments/dev/identity-providers")
    assert (status, listed) == (200, {"identity_providers": [updated]})
    assert await call(dev, "GET", IDP) == (200, updated)

    status, deleted = await call(dev, "DELETE", IDP)
    assert status == 200
    assert deleted == {
        "revision": 3,
        "propagation": {"revision": 3, "live": 0, "applied": 0, "pending": []},
    }
    assert "idp/corp" not in (await store.snapshot("dev")).policies
    assert (await call(dev, "GET", IDP))[0] == 404
    assert (await call(dev, "DELETE", IDP))[0] == 404


async def test_identity_provider_unknown_environment_is_404(api: Client) -> None:
    body = {"issuer": "https://i.example", "discovery": True}
    status, answer = await call(api, "PUT", IDP, body)
    assert status == 404
    assert answer["details"] == {"kind": "environment", "name": "dev"}


ISS = "https://i.example"


def idp(**fields: Any) -> dict[str, Any]:
    return {"issuer": ISS, **fields}


_BAD: list[tuple[dict[str, Any], str]] = [
    (idp(), "$.jwks_uri"),
    (idp(discovery=True, jwks_uri="https://k"), "$.discovery"),
    (idp(jwks_uri="https://k", jwks={"keys": [JWK]}), "$.jwks"),
    ({"issuer": "not a url", "discovery": True}, "$.issuer"),
    ({"issuer": ISS + "#frag", "discovery": True}, "$.issuer"),
    (idp(jwks_uri="/certs"), "$.jwks_uri"),
    (idp(discovery=True, algorithms=["HS256"]), "$.algorithms[0]"),
    (idp(discovery=True, algorithms=["none"]), "$.algorithms[0]"),
    (idp(discovery=True, algorithms=[]), "$.algorithms"),
    (idp(discovery=True, clock_skew_s=-1), "$.clock_skew_s"),
    (idp(discovery=True, jwks_refresh_s=0), "$.jwks_refresh_s"),
    (idp(discovery=True, audiences=[""]), "$.audiences[0]"),
    (idp(discovery=True, scopes=[]), "$.scopes"),
    (idp(jwks={"keys": []}), "$.jwks.keys"),
    (idp(jwks={"keys": [{"x": 1}]}), "$.jwks.keys[0]"),
    (idp(jwks={"keys": [JWK, {**JWK, "d": "secret"}]}), "$.jwks.keys[1]"),
    (idp(jwks={"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}), "$.jwks.keys[0]"),
    (idp(jwks={"keys": [JWK, {**JWK, "alg": ["ES256"]}]}), "$.jwks.keys[1].alg"),
    (idp(jwks={"keys": [{**JWK, "alg": {"name": "ES256"}}]}), "$.jwks.keys[0].alg"),
    (idp(jwks={"keys": [{**JWK, "kid": 7}]}), "$.jwks.keys[0].kid"),
    (idp(jwks={"keys": [{**JWK, "use": None}]}), "$.jwks.keys[0].use"),
    (idp(jwks={"keys": [{**JWK, "crv": 256}]}), "$.jwks.keys[0].crv"),
    (idp(jwks={"keys": [{**JWK, "x": 10**30}]}), "$.jwks.keys[0].x"),
    (idp(jwks={"keys": [{**JWK, "key_ops": "verify"}]}), "$.jwks.keys[0].key_ops"),
    (idp(jwks={"keys": [{**JWK, "key_ops": [1]}]}), "$.jwks.keys[0].key_ops"),
]


@pytest.mark.parametrize(("body", "field"), _BAD)
async def test_identity_provider_bad_body_is_422_naming_the_field(
    dev: Client, body: dict[str, Any], field: str
) -> None:
    status, answer = await call(dev, "PUT", IDP, body)
    assert status == 422
    assert answer["details"] == {"field": field, "in": "body"}
    assert "secret" not in msgspec.json.encode(answer).decode()


async def test_identity_provider_issuer_with_crlf_is_422(
    dev: Client, store: Store
) -> None:
    body = {"issuer": "https://idp.example/a\r\nX-Injected: 1", "discovery": True}
    status, answer = await call(dev, "PUT", IDP, body)
    assert (status, answer) == (
        422,
        {
            "error": "validation_error",
            "message": "$.issuer: must not contain whitespace or control characters",
            "details": {"field": "$.issuer", "in": "body"},
        },
    )
    assert await store.revision("dev") == 0


async def test_identity_provider_jwk_member_of_wrong_type_is_422_naming_it(
    dev: Client, store: Store
) -> None:
    body = idp(jwks={"keys": [JWK, {**JWK, "kid": "k2", "alg": ["ES256"]}]})
    status, answer = await call(dev, "PUT", IDP, body)
    assert (status, answer) == (
        422,
        {
            "error": "validation_error",
            "message": "$.jwks.keys[1].alg: must be a string",
            "details": {"field": "$.jwks.keys[1].alg", "in": "body"},
        },
    )
    assert await store.revision("dev") == 0


async def test_identity_provider_jwk_unknown_member_of_any_size_is_kept(
    dev: Client,
) -> None:
    key = {**JWK, "x_created": 10**30}
    status, answer = await call(dev, "PUT", IDP, idp(jwks={"keys": [key]}))
    assert (status, answer["jwks"]) == (201, {"keys": [key]})
    assert await call(dev, "GET", IDP) == (200, answer)


async def test_identity_provider_delete_in_use_is_409_naming_agents(
    api: Client, store: Store
) -> None:
    await setup_agent(api)
    await setup_agent(api, agent="other")
    await add_idp(api)
    auth = {"type": "oauth", "oauth": {"identity_providers": ["corp"]}}
    for agent in ("helper", "other"):
        path = f"/projects/shop/agents/{agent}/deployments"
        body = {"environment": "dev", "endpoint_auth": auth}
        assert (await call(api, "POST", path, body))[0] == 201
    revision = await store.revision("dev")

    status, answer = await call(api, "DELETE", IDP)
    assert status == 409
    assert answer == {
        "error": "identity_provider_in_use",
        "message": "Identity provider 'corp' is used by: shop/helper, shop/other",
        "details": {"agents": ["shop/helper", "shop/other"]},
    }
    assert await store.revision("dev") == revision
    assert "idp/corp" in (await store.snapshot("dev")).policies


async def test_identity_provider_issuer_change_shared_by_a_deployment_is_409(
    api: Client, store: Store
) -> None:
    await setup_agent(api)
    await setup_agent(api, agent="other")
    for name in ("corp", "partner", "spare"):
        await add_idp(api, name=name)
    both = {"type": "oauth", "oauth": {"identity_providers": ["corp", "partner"]}}
    alone = {"type": "oauth", "oauth": {"identity_providers": ["spare"]}}
    for agent, auth in (("helper", both), ("other", alone)):
        path = f"/projects/shop/agents/{agent}/deployments"
        body = {"environment": "dev", "endpoint_auth": auth}
        assert (await call(api, "POST", path, body))[0] == 201
    revision = await store.revision("dev")

    partner = "/environments/dev/identity-providers/partner"
    moved = {"issuer": "https://corp.example.com", "discovery": True}
    status, answer = await call(api, "PUT", partner, moved)
    assert (status, answer) == (
        409,
        {
            "error": "duplicate_issuer",
            "message": "Identity provider 'partner' would share the issuer "
            "'https://corp.example.com' with corp, selected with it by: shop/helper",
            "details": {"agents": ["shop/helper"], "identity_providers": ["corp"]},
        },
    )
    assert await store.revision("dev") == revision

    # Selected alone, an identity provider may take another one's issuer.
    spare = "/environments/dev/identity-providers/spare"
    assert (await call(api, "PUT", spare, moved))[0] == 200
