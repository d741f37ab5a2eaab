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

#: How long handlers cut at the end of a drain get to close their connections.
_CLOSE_S = 1.0


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
    """Run one worker until SIGTERM, then drain and clean up.

    The traffic port is bound only once the first snapshot is applied: a
    worker without policies would answer 404 for every deployed agent. While
    the store cannot be reached at start, the worker keeps retrying it and
    takes no traffic; the other workers of the gateway serve meanwhile.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    idps: IdentityProviderSink | None = _identity_providers()
    table = PolicyTable(idps)
    store = open_store(settings.store)
    loaded = asyncio.Event()
    sync = PolicySync(store, settings.environment, table, loaded.set)
    proxy = Proxy(table, connection_limit=settings.upstream_connection_limit)
    await proxy.start()
    sync.start()
    flusher = asyncio.create_task(_flush_metrics())

    if await _loaded_before_stop(loaded, stop):
        server = _traffic_server(settings, proxy)
        runner = await _listen(settings, server)
        on_ready()
        await stop.wait()
        await _drain(runner, server, settings.drain_grace_s)

    flusher.cancel()
    flush()  # the drained requests count too
    await _close(sync, proxy, idps, store)
    gateway_log.info("worker stopped")


async def _loaded_before_stop(loaded: asyncio.Event, stop: asyncio.Event) -> bool:
    """Wait for the first snapshot; False when SIGTERM comes first."""
    waits = [asyncio.create_task(loaded.wait()), asyncio.create_task(stop.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in waits:
        task.cancel()
    return not stop.is_set()


async def _listen(settings: GatewaySettings, server: TrafficServer) -> web.ServerRunner:
    # The drain keeps the grace itself (see _drain); what aiohttp's own
    # shutdown then finds is closed within a moment.
    runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=_CLOSE_S)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_port=True)
    await site.start()
    gateway_log.info("worker serving %s:%d", settings.host, settings.port)
    return runner


async def _drain(
    runner: web.ServerRunner, server: TrafficServer, grace_s: float
) -> None:
    """Stop accepting, let in-flight requests finish within the grace, cut the rest.

    aiohttp's shutdown alone would wait the grace, then only ask the handlers
    to stop (one awaiting its upstream does not notice) and wait as long
    again. Cancelling a handler closes its upstream and the caller's
    connection, so a cut stream never passes for a complete one.
    """
    gateway_log.info("worker draining (up to %.1f s)", grace_s)
    for site in list(runner.sites):
        await site.stop()
    server.pre_shutdown()  # no request after the one in progress
    busy = []
    for connection in list(server.connections):
        task = connection._task_handler
        if connection._request_in_progress and task is not None and not task.done():
            busy.append(task)
        else:
            # Idle: closed now, so its caller goes elsewhere at once instead of
            # waiting out the grace for an answer that would never come.
            connection.force_close()

    late: set[asyncio.Task[None]] = set()
    if busy:
        _, late = await asyncio.wait(busy, timeout=grace_s)
    if late:
        gateway_log.warning("drain grace over: cutting %d request(s)", len(late))
        for task in late:
            task.cancel()
        await asyncio.wait(late, timeout=_CLOSE_S)
    await runner.cleanup()


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
