"""The policy table: a change touches only its keys; broken policies fail closed."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.auth import AuthFailure, NoAuth
from gateway.oauth import IdentityProviders
from gateway.policies import PolicyTable, describe_writes
from gateway.policy import (
    AgentPolicy,
    ApiKeyPolicy,
    EndpointAuth,
    IdentityProviderPolicy,
    OAuthSettings,
    agent_key,
    apikey_key,
    encode_policy,
    idp_key,
)
from tests.gateway.tokenkit import ISSUER, ec_key, jwk, rsa_key, sign


def _agent(name: str, upstream: str = "http://127.0.0.1:9/base", **kw: object) -> bytes:
    fields: dict[str, object] = {
        "project": "p",
        "agent": name,
        "upstream_url": upstream,
        "timeout_s": 5.0,
        "endpoint_auth": EndpointAuth(type="none"),
        "revision": 1,
    }
    fields.update(kw)
    return encode_policy(AgentPolicy(**fields))  # type: ignore[arg-type]


def test_policy_table_change_touches_only_its_key() -> None:
    table = PolicyTable(None)
    table.apply(1, {agent_key("p", f"a{i}"): _agent(f"a{i}") for i in range(10_000)})
    before = dict(table.routes)

    table.apply(2, {agent_key("p", "a7"): _agent("a7", "http://127.0.0.1:10/")})

    assert table.revision == 2
    changed = [k for k, route in table.routes.items() if route is not before[k]]
    assert changed == [("p", "a7")]
    route = table.routes[("p", "a7")]
    assert (route.origin.key, route.host_header) == (
        ("http", "127.0.0.1", 10),
        "127.0.0.1:10",
    )


def test_policy_table_snapshot_diff_keeps_unchanged_routes() -> None:
    table = PolicyTable(None)
    table.apply(1, {agent_key("p", "a"): _agent("a"), agent_key("p", "b"): _agent("b")})
    kept = table.routes[("p", "a")]

    writes = table.diff({agent_key("p", "a"): _agent("a")})
    assert writes == {agent_key("p", "b"): None}

    table.apply(5, writes)
    assert table.routes == {("p", "a"): kept}


@pytest.mark.parametrize("name", ["P/a", "p/", "/a", "p/a/b", "p/a b", "p/-a"])
def test_policy_table_agent_key_of_no_name_is_not_served(name: str) -> None:
    table = PolicyTable(None)
    table.apply(1, {"agent/" + name: _agent("a")})
    assert table.routes == {}


def test_policy_table_malformed_policy_is_absent() -> None:
    table = PolicyTable(None)
    table.apply(1, {agent_key("p", "a"): _agent("a")})
    table.apply(2, {agent_key("p", "a"): b"{not json"})
    assert ("p", "a") not in table.routes


async def test_policy_table_oauth_without_identity_providers_fails_closed() -> None:
    auth = EndpointAuth(type="oauth", oauth=OAuthSettings(identity_providers=["x"]))
    table = PolicyTable(None)
    table.apply(1, {agent_key("p", "a"): _agent("a", endpoint_auth=auth)})

    authenticator = table.routes[("p", "a")].authenticator
    with pytest.raises(AuthFailure) as failure:
        await authenticator.authenticate(CIMultiDictProxy(CIMultiDict()))
    assert (failure.value.status, failure.value.error) == (503, "auth_unavailable")


def test_policy_table_auth_none_strips_identity_headers() -> None:
    table = PolicyTable(None)
    table.apply(1, {agent_key("p", "a"): _agent("a")})
    authenticator = table.routes[("p", "a")].authenticator
    assert isinstance(authenticator, NoAuth)
    assert "x-auth-subject" in authenticator.strip


def test_policy_table_api_keys_apply_and_revoke() -> None:
    table = PolicyTable(None)
    key = encode_policy(ApiKeyPolicy(project="p", agent="a", name="ci"))
    table.apply(1, {apikey_key("ab" * 32): key})
    assert len(table.api_keys) == 1

    table.apply(2, {apikey_key("ab" * 32): None})
    assert len(table.api_keys) == 0


def test_describe_writes_never_names_api_key_hashes() -> None:
    writes: dict[str, bytes | None] = {
        agent_key("p", "a"): b"{}",
        apikey_key("cd" * 32): None,
        "idp/corp": None,
    }
    assert describe_writes(writes) == (
        "agent/p/a set, idp/corp removed, 1 api key(s) changed"
    )


async def test_policy_table_identity_provider_with_odd_jwk_is_applied() -> None:
    idps = IdentityProviders()
    key = ec_key()
    keys = [jwk(rsa_key(), "odd", alg=["RS256"], x_n=10**30), jwk(key, "k1")]
    policy = IdentityProviderPolicy(name="corp", issuer=ISSUER, jwks={"keys": keys})
    auth = EndpointAuth(type="oauth", oauth=OAuthSettings(identity_providers=["corp"]))
    table = PolicyTable(idps)
    table.apply(
        1,
        {
            idp_key("corp"): encode_policy(policy),
            agent_key("p", "a"): _agent("a", endpoint_auth=auth),
        },
    )

    token = "Bearer " + sign(key, "ES256", "k1")
    authenticator = table.routes[("p", "a")].authenticator
    identity = await authenticator.authenticate(
        CIMultiDictProxy(CIMultiDict([("Authorization", token)]))
    )
    assert identity.headers[1:] == (
        ("X-Auth-Issuer", ISSUER),
        ("X-Auth-Identity-Provider", "corp"),
    )
    await idps.close()


class _RefusingSink:
    """Identity providers that refuse every policy, remembering removals."""

    def __init__(self) -> None:
        self.removed: list[str] = []

    def apply(self, name: str, policy: IdentityProviderPolicy | None) -> None:
        if policy is not None:
            raise RuntimeError("cannot apply")
        self.removed.append(name)


def test_policy_table_identity_provider_that_cannot_be_applied_is_removed() -> None:
    sink = _RefusingSink()
    policy = IdentityProviderPolicy(name="corp", issuer=ISSUER, discovery=True)
    PolicyTable(sink).apply(1, {idp_key("corp"): encode_policy(policy)})
    assert sink.removed == ["corp"]
