"""A worker takes traffic only with its policies loaded, and drains within its grace."""

from __future__ import annotations

import asyncio
import collections
import os
import re
import signal

import aiohttp

from gateway.store import Store, open_store
from tests.fixtures.stack import (
    AgentProcess,
    GatewayFactory,
    GatewayProcess,
    commit_agent,
)
from tests.fixtures.stores import RedisServer


async def _statuses(url: str, count: int) -> dict[int, int]:
    """Statuses of ``count`` requests, each on a new connection (a new worker pick)."""
    seen: collections.Counter[int] = collections.Counter()
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        for _ in range(count):
            async with http.get(url) as response:
                await response.read()
                seen[response.status] += 1
    return dict(seen)


async def _readyz(gateway: GatewayProcess) -> tuple[int, object]:
    url = f"{gateway.admin_url}/readyz"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, await response.json()


async def _until_logged(gateway: GatewayProcess, pattern: str) -> re.Match[str]:
    for _ in range(400):
        match = re.search(pattern, gateway.log())
        if match is not None:
            return match
        await asyncio.sleep(0.025)
    raise AssertionError(f"never logged {pattern!r}:\n{gateway.log()}")


async def _worker_pids(store: Store, environment: str, count: int) -> list[int]:
    for _ in range(400):
        workers = await store.workers(environment)
        if len(workers) == count:
            return [worker.pid for worker in workers]
        await asyncio.sleep(0.025)
    raise AssertionError(f"never saw {count} workers")


async def test_worker_restarted_while_store_is_down_takes_no_traffic(
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    environment: str,
    upstream_agent: AgentProcess,
) -> None:
    store = open_store(redis_server.url)
    try:
        await commit_agent(store, environment, "p", "a", upstream_agent.url)
        gateway = await gateway_factory(
            store=redis_server.url, environment=environment, workers=2
        )
        killed = (await _worker_pids(store, environment, 2))[0]

        redis_server.stop()
        os.kill(killed, signal.SIGKILL)
        await _until_logged(gateway, rf"pid {killed}\) exited with")
        started = r"started \(pid \d+\)[\s\S]*" * 2 + r"started \(pid (\d+)\)"
        new_pid = (await _until_logged(gateway, started))[1]
        # The new worker is up and retrying the store: it must not answer.
        await _until_logged(gateway, rf"\[{new_pid}\] store unavailable")
        assert await _statuses(f"{gateway.url}/p/a/x", 40) == {200: 40}
        assert await _readyz(gateway) == (
            503,
            {"status": "starting", "ready": 1, "workers": 2},
        )

        # The private server comes back empty: deploy again, as a new store.
        redis_server.start()
        await store.close()
        store = open_store(redis_server.url)
        await commit_agent(store, environment, "p", "a", upstream_agent.url)
        await gateway.wait_http(f"{gateway.admin_url}/readyz", lambda s: s == 200)
        assert await _statuses(f"{gateway.url}/p/a/x", 40) == {200: 40}
    finally:
        await store.close()


async def test_worker_restarted_answers_only_once_loaded(
    gateway_factory: GatewayFactory,
    redis_url: str,
    environment: str,
    upstream_agent: AgentProcess,
) -> None:
    store = open_store(redis_url)
    try:
        await commit_agent(store, environment, "p", "a", upstream_agent.url)
        gateway = await gateway_factory(
            store=redis_url, environment=environment, workers=2
        )
        killed = (await _worker_pids(store, environment, 2))[0]
        os.kill(killed, signal.SIGKILL)
        await _until_logged(gateway, rf"pid {killed}\) exited with")

        # Until the new worker is ready, and a while after: never a 404.
        seen: collections.Counter[int] = collections.Counter()
        while (await _readyz(gateway))[0] != 200:
            seen.update(await _statuses(f"{gateway.url}/p/a/x", 5))
        seen.update(await _statuses(f"{gateway.url}/p/a/x", 40))
        assert set(seen) == {200}
    finally:
        await store.close()
