"""One gateway worker process: policies, the traffic port, and a clean drain."""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
from collections.abc import Callable
from typing import Any

import uvloop

from gateway.cli import GatewaySettings, configure_logging
from gateway.log import gateway_log
from gateway.metrics import FLUSH_INTERVAL_S, flush
from gateway.policies import IdentityProviderSink, PolicyTable
from gateway.proxy import Proxy
from gateway.store import open_store
from gateway.sync import PolicySync
from gateway.traffic import TrafficServer

__all__ = ["run_worker", "serve"]

#: How long handlers cut at the end of a drain get to close their connections.
_CLOSE_S = 1.0

#: How often a worker looks whether its supervisor is still there.
_WATCH_S = 1.0


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
        max_header_size=settings.max_header_size,
        max_header_count=settings.max_header_count,
        header_timeout_s=settings.header_timeout_s,
        keepalive_s=settings.keepalive_s,
        send_timeout_s=settings.send_timeout_s,
        access_log_enabled=settings.access_log,
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
    proxy = Proxy(
        table,
        connection_limit=settings.upstream_connection_limit,
        idle_timeout_s=settings.upstream_idle_timeout_s,
    )
    await proxy.start()
    sync.start()
    flusher = asyncio.create_task(_flush_metrics())
    watcher = asyncio.create_task(_watch_supervisor(stop))

    if await _loaded_before_stop(loaded, stop):
        server = _traffic_server(settings, proxy)
        await server.listen(settings.host, settings.port)
        gateway_log.info("worker serving %s:%d", settings.host, settings.port)
        on_ready()
        await stop.wait()
        gateway_log.info("worker draining (up to %.1f s)", settings.drain_grace_s)
        await server.drain(settings.drain_grace_s, _CLOSE_S)
        await server.close()

    flusher.cancel()
    watcher.cancel()
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


async def _watch_supervisor(stop: asyncio.Event) -> None:
    """Drain and stop once the supervisor is gone.

    A supervisor that is killed (SIGKILL, the OOM killer) asks no worker to
    stop: one left behind would hold the traffic port, so that a gateway
    started again could not bind it, and would serve with no one watching.
    """
    supervisor = os.getppid()
    while not stop.is_set():
        await asyncio.sleep(_WATCH_S)
        if os.getppid() != supervisor:
            gateway_log.warning("supervisor (pid %d) is gone: draining", supervisor)
            stop.set()


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
