"""Typed application state shared by the control plane's handlers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from controlplane.routing import Route
from gateway.store import Store

__all__ = ["HTTP_CLIENT", "OPENAPI", "ROUTES", "SETTINGS", "STORE", "Settings"]


@dataclass(frozen=True)
class Settings:
    """Configuration the handlers need; the token is never logged."""

    admin_token: str

    def __repr__(self) -> str:
        return "Settings(admin_token=<hidden>)"


STORE = web.AppKey("store", Store)
SETTINGS = web.AppKey("settings", Settings)
HTTP_CLIENT = web.AppKey("http_client", aiohttp.ClientSession)
#: Every registered route, for the OpenAPI document.
ROUTES: web.AppKey[list[Route[Any]]] = web.AppKey("routes", list[Route[Any]])
#: The OpenAPI document, encoded once when the application is built.
OPENAPI = web.AppKey("openapi", bytes)
