"""The OpenAPI 3.1 document, built from the routes and the models they decode with."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import msgspec
from aiohttp import web

from controlplane.models import NAME_PATTERN, ErrorView
from controlplane.routing import PREFIX, Route
from controlplane.state import OPENAPI

__all__ = ["build_document", "routes"]

_REF = "#/components/schemas/{name}"
_PARAM = re.compile(r"\{(\w+)\}")
_NAME_SCHEMA = {"type": "string", "pattern": NAME_PATTERN, "maxLength": 63}

_ERRORS = {
    400: "The body is not JSON",
    401: "No valid admin token",
    404: "Unknown resource",
    409: "Conflicts with the current state",
    413: "The body is too large",
    422: "A field, path or query parameter breaks the schema or a rule",
    503: "The store cannot be reached",
}


def _schemas(routes: Sequence[Route[Any]]) -> tuple[dict[Any, Any], dict[str, Any]]:
    """Each model's schema (a ``$ref`` for Structs) and the shared components."""
    types: list[Any] = [ErrorView]
    for route in routes:
        types += [route.body_type] if route.body_type is not None else []
        types += list(route.responses.values()) + [q.type for q in route.query]
    unique = list(dict.fromkeys(types))
    schemas, components = msgspec.json.schema_components(unique, ref_template=_REF)
    return dict(zip(unique, schemas, strict=True)), components


def _json(schema: object) -> dict[str, object]:
    return {"application/json": {"schema": schema}}


def _parameters(route: Route[Any], schemas: dict[Any, Any]) -> list[dict[str, Any]]:
    path = [
        {"name": name, "in": "path", "required": True, "schema": _NAME_SCHEMA}
        for name in _PARAM.findall(route.path)
    ]
    query = [
        {
            "name": q.name,
            "in": "query",
            "required": False,
            "description": q.description,
            "schema": schemas[q.type],
        }
        for q in route.query
    ]
    return path + query


def _operation(route: Route[Any], schemas: dict[Any, Any]) -> dict[str, object]:
    responses: dict[str, object] = {
        str(status): {"description": "Success", "content": _json(schemas[model])}
        for status, model in route.responses.items()
    }
    error = _json(schemas[ErrorView])
    for status, text in _ERRORS.items():
        responses[str(status)] = {"description": text, "content": error}

    operation: dict[str, object] = {
        "operationId": route.handler.__name__,
        "summary": route.summary,
        "parameters": _parameters(route, schemas),
        "responses": responses,
    }
    if route.body_type is not None:
        body = {"required": True, "content": _json(schemas[route.body_type])}
        operation["requestBody"] = body
    return operation


def build_document(routes: Sequence[Route[Any]]) -> dict[str, object]:
    schemas, components = _schemas(routes)
    paths: dict[str, dict[str, object]] = {}
    for route in routes:
        operations = paths.setdefault(PREFIX + route.path, {})
        operations[route.method.lower()] = _operation(route, schemas)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Agent Gateway control plane", "version": "1"},
        "security": [{"adminToken": []}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}},
        },
    }


async def get_openapi(request: web.Request, _: None) -> web.StreamResponse:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


routes: list[Route[Any]] = [
    Route("GET", "/openapi.json", get_openapi, "This document", responses={200: dict}),
]
