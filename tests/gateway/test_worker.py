"""A worker takes traffic only with its policies loaded, and drains within its grace."""

from __future__ import annotations

import asyncio
import collections
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from gateway.store import Store, open_store
from tests.fixtures.stack import (
    AgentProcess,
    GatewayFactory,
    GatewayProcess,
    commit_agent,
    start_gateway,
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


@pytest.fixture
async def two_workers(
    gateway_factory: GatewayFactory,
    redis_url: str,
    environment: str,
    upstream_agent: AgentProcess,
) -> tuple[GatewayProcess, list[int]]:
    """A gateway of two workers serving p/a, and the workers' pids."""
    store = open_store(redis_url)
    try:
        await commit_agent(store, environment, "p", "a", upstream_agent.url)
        gateway = await gateway_factory(
            store=redis_url, environment=environment, workers=2
        )
        return gateway, await _worker_pids(store, environment, 2)
    finally:
        await store.close()


async def test_worker_restarted_answers_only_once_loaded(
    two_workers: tuple[GatewayProcess, list[int]],
) -> None:
    gateway, pids = two_workers
    killed = pids[0]
    os.kill(killed, signal.SIGKILL)
    await _until_logged(gateway, rf"pid {killed}\) exited with")

    # Until the new worker is ready, and a while after: never a 404.
    seen: collections.Counter[int] = collections.Counter()
    while (await _readyz(gateway))[0] != 200:
        seen.update(await _statuses(f"{gateway.url}/p/a/x", 5))
    seen.update(await _statuses(f"{gateway.url}/p/a/x", 40))
    assert set(seen) == {200}


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_worker_stops_when_its_supervisor_is_killed(
    two_workers: tuple[GatewayProcess, list[int]],
) -> None:
    gateway, pids = two_workers

    # SIGKILL: the supervisor asks no one to drain.
    os.kill(gateway.pid, signal.SIGKILL)
    gateway.process.wait()
    for _ in range(400):
        if not any(_alive(pid) for pid in pids):
            break
        await asyncio.sleep(0.025)
    assert [pid for pid in pids if _alive(pid)] == []
    assert "is gone: draining" in gateway.log()
    # Nothing holds the traffic port any more.
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", gateway.port)


# -- the drain --------------------------------------------------------------------


class SilentAgent:
    """An agent that starts a stream, then says nothing until the gateway hangs up."""

    def __init__(self) -> None:
        self.hung_up = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n8\r\ndata: 1\n\r\n"
        )
        await writer.drain()
        await reader.read()  # b"" once the gateway closes the connection
        self.hung_up.set()
        writer.close()

    def close(self) -> None:
        assert self.server is not None
        self.server.close()


@pytest.fixture
async def silent_agent() -> AsyncIterator[SilentAgent]:
    agent = SilentAgent()
    await agent.start()
    yield agent
    agent.close()


async def _drain_gateway(
    tmp_path: Path, store_path: Path, environment: str, grace_s: float
) -> GatewayProcess:
    return await start_gateway(
        tmp_path,
        store=str(store_path),
        environment=environment,
        extra_env={"AGW_DRAIN_GRACE_S": str(grace_s)},
    )


async def _exit_code(gateway: GatewayProcess) -> tuple[int, float]:
    started = time.monotonic()
    gateway.terminate()
    code = await asyncio.to_thread(gateway.process.wait, 30)
    return code, time.monotonic() - started


async def test_worker_drain_cuts_a_silent_stream_at_the_grace(
    tmp_path: Path,
    embedded_path: Path,
    environment: str,
    silent_agent: SilentAgent,
) -> None:
    store = open_store(str(embedded_path))
    await commit_agent(store, environment, "p", "a", silent_agent.url, timeout_s=60)
    await store.close()
    gateway = await _drain_gateway(tmp_path, embedded_path, environment, 3.0)
    try:
        url = f"{gateway.url}/p/a/events"
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            assert await response.content.readuntil(b"\n") == b"data: 1\n"
            code, elapsed = await _exit_code(gateway)
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
        await asyncio.wait_for(silent_agent.hung_up.wait(), 5)
    finally:
        gateway.stop()

    assert code == 0
    # aiohttp's own shutdown took twice the grace, then the worker was killed.
    assert 3.0 <= elapsed < 3.0 + 2.5
    assert "cutting 1 request(s)" in gateway.log()
    assert "did not stop; killing" not in gateway.log()


async def test_worker_drain_lets_a_stream_finish_within_the_grace(
    tmp_path: Path,
    embedded_path: Path,
    environment: str,
    upstream_agent: AgentProcess,
) -> None:
    store = open_store(str(embedded_path))
    await commit_agent(store, environment, "p", "a", upstream_agent.url)
    await store.close()
    gateway = await _drain_gateway(tmp_path, embedded_path, environment, 10.0)
    try:
        async with aiohttp.ClientSession() as http:
            url = f"{gateway.url}/p/a/drip?count=4&gap=0.25"
            async with http.get(url) as response:
                assert response.status == 200
                gateway.terminate()
                body = await response.read()
        code = await asyncio.to_thread(gateway.process.wait, 30)
    finally:
        gateway.stop()

    assert body == b"chunk 0\nchunk 1\nchunk 2\nchunk 3\n"
    assert code == 0
    assert "cutting" not in gateway.log()


async def test_worker_drain_closes_idle_keep_alive_connections_at_once(
    tmp_path: Path,
    embedded_path: Path,
    environment: str,
    silent_agent: SilentAgent,
) -> None:
    store = open_store(str(embedded_path))
    await commit_agent(store, environment, "p", "a", silent_agent.url, timeout_s=60)
    await store.close()
    gateway = await _drain_gateway(tmp_path, embedded_path, environment, 10.0)
    try:
        # A stream in flight keeps the drain busy; a second connection idles.
        stream, stream_writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        stream_writer.write(b"GET /p/a/events HTTP/1.1\r\nHost: gw\r\n\r\n")
        await stream.readuntil(b"data: 1\n")
        idle, idle_writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        idle_writer.write(b"GET /nowhere/x HTTP/1.1\r\nHost: gw\r\n\r\n")
        await idle.readuntil(b'"No agent is deployed here"}')

        gateway.terminate()
        await _until_logged(gateway, "worker draining")
        # Closed at the start of the drain: the caller learns it at once,
        # rather than when the grace is over.
        assert await asyncio.wait_for(idle.read(), 5) == b""
        idle_writer.close()
        stream_writer.transport.abort()  # the stream's caller goes: drain ends
        assert await asyncio.to_thread(gateway.process.wait, 5) == 0
    finally:
        gateway.stop()
