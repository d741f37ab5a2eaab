"""Policy sync: several workers apply every change; a store outage is survived."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from gateway.policies import PolicyTable
from gateway.store import Store, open_store
from gateway.sync import PolicySync
from tests.fixtures.stack import (
    AgentProcess,
    GatewayFactory,
    commit_agent,
)
from tests.fixtures.stores import RedisServer


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[Store]:
    store = open_store(redis_url)
    yield store
    await store.close()


async def _agent_answering(url: str, name: str) -> None:
    """Poll ``url`` until the test agent called ``name`` answers it."""
    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            try:
                async with http.get(url) as response:
                    if response.status == 200 and (
                        (await response.json())["agent"] == name
                    ):
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.02)
    raise AssertionError(f"{url} never reached agent {name}")


async def test_sync_two_workers_apply_each_change(
    gateway_factory: GatewayFactory,
    redis_url: str,
    redis_store: Store,
    environment: str,
    upstream_agent: AgentProcess,
) -> None:
    await commit_agent(redis_store, environment, "p", "a", upstream_agent.url)
    gateway = await gateway_factory(store=redis_url, environment=environment, workers=2)
    revision = await commit_agent(
        redis_store, environment, "p", "b", upstream_agent.url
    )

    for _ in range(200):
        workers = await redis_store.workers(environment)
        if len(workers) == 2 and all(w.revision == revision for w in workers):
            break
        await asyncio.sleep(0.025)
    assert [w.revision for w in workers] == [revision, revision]
    assert len({w.pid for w in workers}) == 2

    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway.admin_url}/readyz") as response:
            assert response.status == 200
            assert await response.json() == {
                "status": "ready",
                "ready": 2,
                "workers": 2,
            }
        async with http.get(f"{gateway.admin_url}/metrics") as response:
            metrics = await response.text()
    assert "agw_gateway_policy_revision{pid=" in metrics
    assert f" {float(revision)}" in metrics


async def test_sync_forgets_workers_on_clean_exit(
    gateway_factory: GatewayFactory,
    redis_url: str,
    redis_store: Store,
    environment: str,
) -> None:
    gateway = await gateway_factory(store=redis_url, environment=environment)
    for _ in range(200):
        if await redis_store.workers(environment):
            break
        await asyncio.sleep(0.025)

    assert await asyncio.to_thread(gateway.stop) == 0
    assert await redis_store.workers(environment) == []


async def test_sync_serves_through_store_outage_and_catches_up(
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    environment: str,
    agent_factory: object,
) -> None:
    first = await agent_factory("first")  # type: ignore[operator]
    second = await agent_factory("second")  # type: ignore[operator]
    store = open_store(redis_server.url)
    try:
        # Three revisions, so the emptied server's next one (1) is behind the
        # gateway's and cannot pass for a continuation of its log.
        for _ in range(3):
            await commit_agent(store, environment, "p", "a", first.url)
        gateway = await gateway_factory(store=redis_server.url, environment=environment)
        await _agent_answering(f"{gateway.url}/p/a/x", "first")

        redis_server.stop()
        await asyncio.sleep(0.5)
        await _agent_answering(f"{gateway.url}/p/a/x", "first")

        # The private server keeps no data: it comes back empty, as a
        # replaced store, and the gateway must follow the new one.
        redis_server.start()
        await store.close()
        store = open_store(redis_server.url)
        await commit_agent(store, environment, "p", "a", second.url)
        await _agent_answering(f"{gateway.url}/p/a/x", "second")
    finally:
        await store.close()


async def test_sync_embedded_store_deploy_reaches_gateway(
    gateway_factory: GatewayFactory,
    embedded_path: object,
    environment: str,
    agent_factory: object,
) -> None:
    first = await agent_factory("first")  # type: ignore[operator]
    second = await agent_factory("second")  # type: ignore[operator]
    store = open_store(str(embedded_path))
    try:
        await commit_agent(store, environment, "p", "a", first.url)
        gateway = await gateway_factory(
            store=str(embedded_path), environment=environment, workers=2
        )
        await _agent_answering(f"{gateway.url}/p/a/x", "first")

        await commit_agent(store, environment, "p", "a", second.url)
        await _agent_answering(f"{gateway.url}/p/a/x", "second")
    finally:
        await store.close()


async def test_sync_supervisor_restarts_a_dead_worker(
    gateway_factory: GatewayFactory,
    redis_url: str,
    redis_store: Store,
    environment: str,
) -> None:
    await gateway_factory(store=redis_url, environment=environment)
    for _ in range(200):
        workers = await redis_store.workers(environment)
        if workers:
            break
        await asyncio.sleep(0.025)
    os.kill(workers[0].pid, signal.SIGKILL)

    for _ in range(400):
        pids = {w.pid for w in await redis_store.workers(environment)}
        if pids - {workers[0].pid}:
            return
        await asyncio.sleep(0.025)
    raise AssertionError("no worker came back")


async def test_sync_stop_ends_a_task_whose_cancel_was_lost(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"))
    sync = PolicySync(store, "test", PolicyTable(None))
    lost = 0

    async def swallows_one_cancel() -> None:
        nonlocal lost
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                # As a cancel turned into the TimeoutError of an expiring
                # asyncio.timeout would be: the loop goes on.
                if lost:
                    raise
                lost += 1

    task = asyncio.create_task(swallows_one_cancel())
    sync._tasks = [task]
    await asyncio.wait_for(sync.stop(), 5)
    assert lost == 1 and task.cancelled()
    await store.close()
