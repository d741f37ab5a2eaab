"""The control-plane application: middlewares, state, every resource's routes.

:class:`ApiRunner` serves it with malformed requests answered in the API's
error shape too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

import aiohttp
import msgspec
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from controlplane import (
    apikeys,
    deployments,
    diagnose,
    environments,
    gateways,
    identity_providers,
    invoke,
    openapi,
    projects,
)
from controlplane.admin import admin_auth_middleware
from controlplane.errors import error_middleware, malformed_request_response
from controlplane.routing import Route, register
from controlplane.state import HTTP_CLIENT, OPENAPI, ROUTES, SETTINGS, STORE, Settings
from gateway.store import Store

__all__ = ["MAX_BODY_BYTES", "RESOURCES", "ApiRunner", "create_app"]

#: Resource modules, each exposing ``routes`` (and ``setup(app)`` when it keeps
#: state in the process); a new resource is one more entry.
RESOURCES: tuple[ModuleType, ...] = (
    environments,
    identity_providers,
    projects,
    deployments,
    apikeys,
    invoke,
    diagnose,
    gateways,
    openapi,
)

#: The largest request body accepted (inline JWK sets are the largest bodies).
MAX_BODY_BYTES = 1024 * 1024


async def _http_client(app: web.Application) -> AsyncIterator[None]:
    """One client session for outgoing calls (OpenID discovery)."""
    async with aiohttp.ClientSession() as session:
        app[HTTP_CLIENT] = session
        yield


def create_app(store: Store, admin_token: str) -> web.Application:
    """The control-plane API on ``store``, open only to ``admin_token``."""
    if not admin_token:
        raise ValueError("an admin token is required")

    # The error middleware is outermost so that it also answers auth failures.
    app = web.Application(
        middlewares=[error_middleware, admin_auth_middleware],
        client_max_size=MAX_BODY_BYTES,
    )
    app[STORE] = store
    app[SETTINGS] = Settings(admin_token=admin_token)
    routes: list[Route[Any]] = []
    app[ROUTES] = routes

    for module in RESOURCES:
        if hasattr(module, "setup"):
            module.setup(app)
        register(app, module.routes)
        routes.extend(module.routes)
    app[OPENAPI] = msgspec.json.encode(openapi.build_document(routes))

    app.cleanup_ctx.append(_http_client)
    return app


class _ApiRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering malformed HTTP in our shape."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        response = malformed_request_response(exc)
        if response is None:
            return super().handle_error(request, status, exc, message)
        return response


class _ApiServer(web.Server):
    def __call__(self) -> RequestHandler:
        # web.Server builds its handler from these; ours takes the same
        # arguments, so every limit and timeout configured still applies.
        kwargs: dict[str, Any] = self._kwargs
        return _ApiRequestHandler(self, loop=self._loop, **kwargs)


class ApiRunner(web.AppRunner):
    """Runs the control-plane app; malformed requests get the API's error shape."""

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        kwargs: dict[str, Any] = made._kwargs
        return _ApiServer(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            **kwargs,
        )
