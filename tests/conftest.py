"""Fixtures shared by the whole suite live in tests/fixtures, one module per area."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop

pytest_plugins = [
    "tests.fixtures.stores",
    "tests.fixtures.stack",
    "tests.fixtures.idp",
    "tests.fixtures.tls",
]


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Modules that set ``UVLOOP = True`` run on uvloop, as the gateway does."""
    module = getattr(item, "module", None)
    if getattr(module, "UVLOOP", False):
        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}
