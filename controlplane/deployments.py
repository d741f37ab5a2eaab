"""Deployments: an agent with one endpoint-auth setting in one environment.

Deploying compiles the agent and its endpoint auth into an
:class:`~gateway.policy.AgentPolicy` and commits it with the deployment record
at the next revision; undeploying removes both at once.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from controlplane.changes import Plan, commit
from controlplane.environments import load_environment
from controlplane.errors import NotFound, ValidationFailed
from controlplane.models import (
    ApiKeySectionBody,
    DeploymentBody,
    DeploymentView,
    EndpointAuthBody,
    EndpointAuthView,
    OAuthSectionBody,
    Propagation,
    RevisionView,
)
from controlplane.projects import load_agent
from controlplane.propagation import WAIT, propagation, wait_for
from controlplane.records import (
    Agent,
    Deployment,
    Environment,
    IdentityProvider,
    deployment_record,
    idp_record,
    now,
    read,
)
from controlplane.routing import Route, json_response, name_param
from controlplane.state import STORE
from gateway.policy import (
    AgentPolicy,
    ApiKeySettings,
    EndpointAuth,
    OAuthSettings,
    agent_key,
    encode_policy,
)
from gateway.store import Store

__all__ = ["load_deployment", "resolve_endpoint_auth", "routes"]

_AUTH = "$.endpoint_auth"
DEFAULT_AUTH = EndpointAuth(type="api_key", api_key=ApiKeySettings())


def _check_sections(body: EndpointAuthBody) -> None:
    """At most one section, and only the one ``type`` names."""
    if body.oauth is not None and body.api_key is not None:
        raise ValidationFailed(
            _AUTH, "oauth and api_key are mutually exclusive: give one section"
        )
    for section, present in (("oauth", body.oauth), ("api_key", body.api_key)):
        if present is not None and section != body.type:
            raise ValidationFailed(
                f"{_AUTH}.{section}", f"is not allowed with type {body.type!r}"
            )


def resolve_endpoint_auth(
    body: EndpointAuthBody | None, current: Deployment | None
) -> EndpointAuth:
    """The endpoint auth to deploy, defaults filled in.

    Omitted, it is the current deployment's, or ``api_key`` on a first one.
    """
    if body is None:
        return current.endpoint_auth if current is not None else DEFAULT_AUTH

    _check_sections(body)
    if body.type == "api_key":
        section = body.api_key or ApiKeySectionBody()
        return EndpointAuth(type="api_key", api_key=_api_key(section))
    if body.type == "none":
        return EndpointAuth(type="none")
    if body.oauth is None:
        raise ValidationFailed(
            f"{_AUTH}.oauth.identity_providers", "is required for type 'oauth'"
        )
    return EndpointAuth(type="oauth", oauth=_oauth(body.oauth))


def _api_key(section: ApiKeySectionBody) -> ApiKeySettings:
    return ApiKeySettings(header_name=section.header_name)


def _oauth(section: OAuthSectionBody) -> OAuthSettings:
    return OAuthSettings(
        identity_providers=list(dict.fromkeys(section.identity_providers)),
        audiences=section.audiences,
        header_name=section.header_name,
        auth_header_prefix=section.auth_header_prefix,
        forward_token=section.forward_token,
    )


async def _check_identity_providers(store: Store, env: str, auth: EndpointAuth) -> None:
    """Every selected identity provider must exist in ``env``; 422 naming the rest."""
    if auth.oauth is None:
        return
    names = auth.oauth.identity_providers
    records = {name: await _idp(store, env, name) for name in names}
    unknown = [name for name in names if records[name] is None]
    if unknown:
        raise ValidationFailed(
            f"{_AUTH}.oauth.identity_providers[{names.index(unknown[0])}]",
            f"not an identity provider of environment {env!r}: {', '.join(unknown)}",
            unknown=unknown,
        )
    _check_issuers(names, {n: r.issuer for n, r in records.items() if r})


async def _idp(store: Store, env: str, name: str) -> IdentityProvider | None:
    return (await read(store, idp_record(env, name), IdentityProvider))[0]


def _check_issuers(names: list[str], issuers: dict[str, str]) -> None:
    """A token's issuer selects one identity provider: no two may share one."""
    first: dict[str, str] = {}
    for index, name in enumerate(names):
        other = first.setdefault(issuers[name], name)
        if other != name:
            raise ValidationFailed(
                f"{_AUTH}.oauth.identity_providers[{index}]",
                f"identity providers {other!r} and {name!r} have the same "
                f"issuer {issuers[name]!r}; select one of them",
                identity_providers=[other, name],
            )


def _compile(record: Deployment) -> bytes:
    return encode_policy(
        AgentPolicy(
            project=record.project,
            agent=record.agent,
            upstream_url=record.upstream_url,
            timeout_s=record.timeout_s,
            endpoint_auth=record.endpoint_auth,
            revision=record.revision,
        )
    )


def _view(record: Deployment, env: Environment, state: Propagation) -> DeploymentView:
    auth = record.endpoint_auth
    return DeploymentView(
        project=record.project,
        agent=record.agent,
        environment=record.environment,
        revision=record.revision,
        invoke_url=f"{env.gateway_url}/{record.project}/{record.agent}",
        endpoint_auth=EndpointAuthView(
            type=auth.type, oauth=auth.oauth, api_key=auth.api_key
        ),
        upstream_url=record.upstream_url,
        timeout_s=record.timeout_s,
        created_at=record.created_at,
        propagation=state,
    )


async def _deploy(
    store: Store, agent: Agent, env: str, body: DeploymentBody
) -> tuple[int, Deployment]:
    key = deployment_record(agent.project, agent.name, env)

    async def plan(revision: int) -> Plan[Deployment]:
        current, _ = await read(store, key, Deployment)
        auth = resolve_endpoint_auth(body.endpoint_auth, current)
        await _check_identity_providers(store, env, auth)
        record = Deployment(
            project=agent.project,
            agent=agent.name,
            environment=env,
            revision=revision,
            endpoint_auth=auth,
            upstream_url=agent.upstream_url,
            timeout_s=agent.timeout_s,
            created_at=now(),
        )
        return Plan(
            record,
            records={key: msgspec.json.encode(record)},
            policies={agent_key(agent.project, agent.name): _compile(record)},
        )

    return await commit(store, env, plan)


async def post_deployment(
    request: web.Request, body: DeploymentBody
) -> web.StreamResponse:
    project, name = name_param(request, "project"), name_param(request, "agent")
    wait_s = WAIT.parse(request, 0.0)
    agent = await load_agent(request, project, name)
    environment = await load_environment(request, body.environment)
    store = request.app[STORE]

    revision, record = await _deploy(store, agent, body.environment, body)
    state = await wait_for(store, body.environment, revision, wait_s)
    return json_response(_view(record, environment, state), 201)


async def load_deployment(
    request: web.Request, project: str, agent: str, env: str
) -> tuple[Deployment, Environment]:
    """The current deployment and its environment.

    404 for an unknown agent or environment, or when the agent is not deployed.
    """
    await load_agent(request, project, agent)
    environment = await load_environment(request, env)
    key = deployment_record(project, agent, env)
    record, _ = await read(request.app[STORE], key, Deployment)
    if record is None:
        raise NotFound("deployment", f"{project}/{agent} in {env}")
    return record, environment


async def get_deployment(request: web.Request, _: None) -> web.StreamResponse:
    project, agent = name_param(request, "project"), name_param(request, "agent")
    env = name_param(request, "env")
    record, environment = await load_deployment(request, project, agent, env)

    state = await propagation(request.app[STORE], env, record.revision)
    return json_response(_view(record, environment, state))


async def delete_deployment(request: web.Request, _: None) -> web.StreamResponse:
    project, agent = name_param(request, "project"), name_param(request, "agent")
    env = name_param(request, "env")
    wait_s = WAIT.parse(request, 0.0)
    await load_deployment(request, project, agent, env)
    store = request.app[STORE]
    key = deployment_record(project, agent, env)

    async def plan(revision: int) -> Plan[None]:
        if await store.get(key) is None:
            raise NotFound("deployment", f"{project}/{agent} in {env}")
        return Plan(
            None, records={key: None}, policies={agent_key(project, agent): None}
        )

    revision, _ = await commit(store, env, plan)
    state = await wait_for(store, env, revision, wait_s)
    return json_response(RevisionView(revision=revision, propagation=state))


_DEPLOYMENT = "/projects/{project}/agents/{agent}/deployments/{env}"

routes: list[Route[Any]] = [
    Route(
        "POST",
        "/projects/{project}/agents/{agent}/deployments",
        post_deployment,
        "Deploy an agent to an environment",
        DeploymentBody,
        {201: DeploymentView},
        (WAIT,),
    ),
    Route(
        "GET",
        _DEPLOYMENT,
        get_deployment,
        "Read the current deployment",
        responses={200: DeploymentView},
    ),
    Route(
        "DELETE",
        _DEPLOYMENT,
        delete_deployment,
        "Undeploy: the gateway answers 404 for the agent",
        responses={200: RevisionView},
        query=(WAIT,),
    ),
]
