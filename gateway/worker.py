"""One gateway worker process: policies, the traffic port, and a clean drain."""

from __future__ import annotations

import asyncio
import importlib
import signal
from collections.abc import Callable
from typing import Any

import uvloop
from aiohttp import web

from gateway.cli import GatewaySettings, configure_logging
from gateway.log import access_log, gateway_log
from gateway.metrics import FLUSH_INTERVAL_S, flush
from gateway.policies import IdentityProviderSink, PolicyTable
from gateway.proxy import Proxy, TrafficServer
from gateway.store import open_store
from gateway.sync import PolicySync

__all__ = ["run_worker", "serve"]


def _identity_providers() -> Any:
    """The worker's identity providers, or None while OAuth is not available.

    Routes that need OAuth then fail closed (see PolicyTable).
    """
    try:
        oauth = importlib.import_module("gateway.oauth")
    except ImportError:
        gateway_log.warning("OAuth support is not installed; oauth routes answer 503")
        return None
    return oauth.IdentityProviders()


def _traffic_server(settings: GatewaySettings, proxy: Proxy) -> TrafficServer:
    return TrafficServer(
        proxy.handle,
        # A caller that goes away cancels its handler, and so the upstream call.
        handler_cancellation=True,
        # Bodies pass through as sent: a decoded body would no longer match
        # the Content-Length the caller announced for it.
        auto_decompress=False,
        max_header_size=settings.max_header_size,
        header_timeout_s=settings.header_timeout_s,
        access_log=access_log if settings.access_log else None,
    )


async def serve(settings: GatewaySettings, on_ready: Callable[[], None]) -> None:
    """Run one worker until SIGTERM, then drain and clean up."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    idps: IdentityProviderSink | None = _identity_providers()
    table = PolicyTable(idps)
    store = open_store(settings.store)
    sync = PolicySync(store, settings.environment, table, on_ready)
    proxy = Proxy(table, connection_limit=settings.upstream_connection_limit)
    await proxy.start()

    runner = web.ServerRunner(
        _traffic_server(settings, proxy),
        handle_signals=False,
        shutdown_timeout=settings.drain_grace_s,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_port=True)
    await site.start()
    sync.start()
    flusher = asyncio.create_task(_flush_metrics())
    gateway_log.info("worker serving %s:%d", settings.host, settings.port)

    await stop.wait()
    gateway_log.info("worker draining (up to %.1f s)", settings.drain_grace_s)
    await runner.cleanup()
    flusher.cancel()
    flush()  # the drained requests count too
    await _close(sync, proxy, idps, store)
    gateway_log.info("worker stopped")


async def _flush_metrics() -> None:
    """Hand the hot path's tallies to the metrics files, once an interval."""
    while True:
        await asyncio.sleep(FLUSH_INTERVAL_S)
        flush()


async def _close(sync: PolicySync, proxy: Proxy, idps: Any, store: Any) -> None:
    await sync.stop()
    await proxy.close()
    if idps is not None:
        await idps.close()
    await store.close()


def run_worker(settings: GatewaySettings, ready: Any) -> None:
    """Process entry point; ``ready`` is a multiprocessing Event set once serving."""
    configure_logging(settings.log_level)
    # The supervisor forwards SIGINT as SIGTERM; a worker must not die on the
    # terminal's Ctrl-C before its supervisor asks it to drain.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    uvloop.run(serve(settings, ready.set))
