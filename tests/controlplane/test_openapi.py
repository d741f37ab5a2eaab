"""The OpenAPI document lists every route with the schemas the API decodes with."""

from __future__ import annotations

from typing import Any

import msgspec

from controlplane.state import ROUTES
from tests.controlplane.conftest import Client, call

REF = "#/components/schemas/{name}"


async def test_openapi_lists_every_registered_route(api: Client) -> None:
    status, document = await call(api, "GET", "/openapi.json")
    assert status == 200
    assert document["openapi"] == "3.1.0"

    registered = {
        (route.method.lower(), route.resource.canonical)
        for route in api.app.router.routes()
    }
    documented = {
        (method, path) for path, ops in document["paths"].items() for method in ops
    }
    assert registered == documented
    assert ("get", "/api/v1/openapi.json") in documented


async def test_openapi_request_schemas_are_the_decoders(api: Client) -> None:
    _, document = await call(api, "GET", "/openapi.json")
    components = document["components"]["schemas"]

    with_body = [route for route in api.app[ROUTES] if route.decoder is not None]
    assert len(with_body) == 9
    for route in with_body:
        operation = document["paths"]["/api/v1" + route.path][route.method.lower()]
        (schema,), expected = msgspec.json.schema_components(
            [route.decoder.type], ref_template=REF
        )
        assert (
            operation["requestBody"]["content"]["application/json"]["schema"] == schema
        )
        name = schema["$ref"].rsplit("/", 1)[1]
        assert components[name] == expected[name]


async def test_openapi_documents_wait_and_path_parameters(api: Client) -> None:
    _, document = await call(api, "GET", "/openapi.json")
    deploy: dict[str, Any] = document["paths"][
        "/api/v1/projects/{project}/agents/{agent}/deployments"
    ]["post"]
    names = [(p["name"], p["in"]) for p in deploy["parameters"]]
    assert names == [("project", "path"), ("agent", "path"), ("wait", "query")]
    assert deploy["parameters"][2]["schema"] == {
        "type": "number",
        "minimum": 0,
        "maximum": 30,
    }
    assert set(deploy["responses"]) >= {"201", "401", "404", "409", "422"}
