"""Projects and their agents: what can be deployed, and where it listens.

Neither is a gateway policy: an agent's settings take effect when it is
deployed, so these writes spend no revision.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from controlplane.models import AgentBody, ProjectBody, check_url
from controlplane.records import (
    Agent,
    Project,
    agent_record,
    load,
    now,
    project_record,
    read,
)
from controlplane.routing import Route, json_response, name_param
from controlplane.state import STORE

__all__ = ["AgentList", "ProjectList", "load_agent", "load_project", "routes"]


class ProjectList(msgspec.Struct, kw_only=True):
    """Every project, sorted by name."""

    projects: list[Project]


class AgentList(msgspec.Struct, kw_only=True):
    """Every agent of a project, sorted by name."""

    agents: list[Agent]


async def load_project(request: web.Request, project: str) -> Project:
    store = request.app[STORE]
    return await load(store, project_record(project), Project, "project", project)


async def load_agent(request: web.Request, project: str, agent: str) -> Agent:
    await load_project(request, project)
    store = request.app[STORE]
    return await load(store, agent_record(project, agent), Agent, "agent", agent)


async def put_project(request: web.Request, _: ProjectBody) -> web.StreamResponse:
    name = name_param(request, "project")
    store = request.app[STORE]

    old, _raw = await read(store, project_record(name), Project)
    if old is not None:
        return json_response(old)
    record = Project(name=name, created_at=now())
    await store.put(project_record(name), msgspec.json.encode(record))
    return json_response(record, 201)


async def list_projects(request: web.Request, _: None) -> web.StreamResponse:
    found = await request.app[STORE].scan("projects/")
    items = [msgspec.json.decode(raw, type=Project) for raw in found.values()]
    return json_response(ProjectList(projects=items))


async def get_project(request: web.Request, _: None) -> web.StreamResponse:
    return json_response(await load_project(request, name_param(request, "project")))


async def put_agent(request: web.Request, body: AgentBody) -> web.StreamResponse:
    project, name = name_param(request, "project"), name_param(request, "agent")
    upstream_url = check_url(body.upstream_url, "$.upstream_url", plain=True)
    await load_project(request, project)
    store = request.app[STORE]

    old, _ = await read(store, agent_record(project, name), Agent)
    stamp = now()
    record = Agent(
        project=project,
        name=name,
        upstream_url=upstream_url.rstrip("/"),
        timeout_s=body.timeout_s,
        created_at=old.created_at if old else stamp,
        updated_at=stamp,
    )
    await store.put(agent_record(project, name), msgspec.json.encode(record))
    return json_response(record, 200 if old else 201)


async def list_agents(request: web.Request, _: None) -> web.StreamResponse:
    project = name_param(request, "project")
    await load_project(request, project)
    found = await request.app[STORE].scan(f"agents/{project}/")
    items = [msgspec.json.decode(raw, type=Agent) for raw in found.values()]
    return json_response(AgentList(agents=items))


async def get_agent(request: web.Request, _: None) -> web.StreamResponse:
    project, name = name_param(request, "project"), name_param(request, "agent")
    return json_response(await load_agent(request, project, name))


_AGENT = "/projects/{project}/agents/{agent}"

routes: list[Route[Any]] = [
    Route(
        "PUT",
        "/projects/{project}",
        put_project,
        "Create a project",
        ProjectBody,
        {200: Project, 201: Project},
    ),
    Route("GET", "/projects", list_projects, "List projects", None, {200: ProjectList}),
    Route(
        "GET",
        "/projects/{project}",
        get_project,
        "Read a project",
        responses={200: Project},
    ),
    Route(
        "PUT",
        _AGENT,
        put_agent,
        "Create or update an agent (takes effect when deployed)",
        AgentBody,
        {200: Agent, 201: Agent},
    ),
    Route(
        "GET",
        "/projects/{project}/agents",
        list_agents,
        "List a project's agents",
        responses={200: AgentList},
    ),
    Route("GET", _AGENT, get_agent, "Read an agent", responses={200: Agent}),
]
