"""Routes as data: each resource module lists its :class:`Route` objects.

A route names its method, path, body model, query parameters and answers.
:func:`register` adds it to the application with a wrapper that decodes the
body with exactly that model, so the OpenAPI document built from the same
routes describes what the API enforces.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgspec
from aiohttp import web

from controlplane.errors import InvalidJson, ValidationFailed
from controlplane.models import check_name

__all__ = [
    "PREFIX",
    "QueryParam",
    "Route",
    "decode_body",
    "json_response",
    "name_param",
    "register",
]

PREFIX = "/api/v1"

B = TypeVar("B")
Handler = Callable[[web.Request, B], Awaitable[web.StreamResponse]]

_encoder = msgspec.json.Encoder()
_FIELD = re.compile(r"`([^`]*)`")


@dataclass(frozen=True)
class QueryParam:
    """A query parameter: its name, its type (schema and parser) and meaning."""

    name: str
    type: Any
    description: str

    def parse(self, request: web.Request, default: Any) -> Any:
        raw = request.query.get(self.name)
        if raw is None:
            return default
        try:
            return msgspec.convert(raw, self.type, strict=False)
        except msgspec.ValidationError as error:
            reason = str(error).split(" - at ", 1)[0]
            raise ValidationFailed(self.name, reason, "query") from None


@dataclass(frozen=True)
class Route(Generic[B]):
    """One API call: ``handler(request, body)`` with ``body`` decoded as ``body_type``.

    ``responses`` maps each success status to the model it answers with.
    """

    method: str
    path: str
    handler: Handler[B]
    summary: str
    body_type: type[B] | None = None
    responses: dict[int, Any] = field(default_factory=dict)
    query: tuple[QueryParam, ...] = ()
    decoder: msgspec.json.Decoder[B] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.body_type is not None:
            decoder = msgspec.json.Decoder(self.body_type)
            object.__setattr__(self, "decoder", decoder)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body: Any = None
        if self.decoder is not None:
            body = decode_body(await request.read(), self.decoder)
        return await self.handler(request, body)


def decode_body(raw: bytes, decoder: msgspec.json.Decoder[B]) -> B:
    """Decode a request body; an empty body is an empty object."""
    try:
        return decoder.decode(raw or b"{}")
    except msgspec.ValidationError as error:
        raise _validation_failed(str(error)) from None
    except msgspec.DecodeError:
        raise InvalidJson("The request body is not valid JSON") from None


def _validation_failed(text: str) -> ValidationFailed:
    """Turn msgspec's message into a field path and a reason.

    msgspec says ``<reason> - at `$.a.b[0]``` and, for a missing or unknown
    field, names the field in the reason; the path then ends with it.
    """
    reason, _, where = text.partition(" - at ")
    path = where.strip("`") or "$"
    if "required field" in reason or "unknown field" in reason:
        named = _FIELD.search(reason)
        if named is not None:
            path = f"{path}.{named.group(1)}"
    return ValidationFailed(path, reason)


def name_param(request: web.Request, name: str) -> str:
    """A path parameter that must be a valid resource name."""
    return check_name(request.match_info[name], name)


def json_response(value: object, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=_encoder.encode(value), content_type="application/json"
    )


def register(app: web.Application, routes: Iterable[Route[Any]]) -> None:
    for route in routes:
        app.router.add_route(route.method, PREFIX + route.path, route.handle)
