"""The supervisor: one gateway per traffic port."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp

from gateway.store import open_store
from tests.fixtures.stack import (
    ROOT,
    AgentProcess,
    GatewayFactory,
    ServiceProcess,
    commit_agent,
    free_port,
)


def _second_gateway(store: Path, environment: str, port: int) -> tuple[int, str]:
    """Run ``python -m gateway`` on ``port`` until it exits; its code and log."""
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "--store", str(store)]
        + ["--environment", environment, "--port", str(port)]
        + ["--admin-port", str(free_port())],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("AGW_")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stderr


async def test_supervisor_refuses_a_port_another_gateway_serves(
    gateway_factory: GatewayFactory,
    embedded_path: Path,
    environment: str,
    upstream_agent: AgentProcess,
) -> None:
    store = open_store(str(embedded_path))
    await commit_agent(store, environment, "p", "a", upstream_agent.url)
    await store.close()
    first = await gateway_factory(store=str(embedded_path), environment=environment)

    # Another environment's gateway: joining would answer 404 for p/a.
    code, log = await asyncio.to_thread(
        _second_gateway, embedded_path, "other", first.port
    )
    assert code == 1
    assert f"cannot start: port {first.port} on 127.0.0.1 is in use" in log
    assert "worker 0 started" not in log

    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        for _ in range(10):
            async with http.get(f"{first.url}/p/a/x") as response:
                assert response.status == 200


async def test_supervisor_refuses_a_port_any_program_listens_on(
    embedded_path: Path,
) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        code, log = await asyncio.to_thread(_second_gateway, embedded_path, "dev", port)

    assert code == 1
    assert f"cannot start: port {port} on 127.0.0.1 is in use" in log


def _closed_by_server(port: int) -> bytes:
    """One request the gateway answers and then hangs up: TIME_WAIT on its side."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /p/a/x HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


async def test_supervisor_starts_again_on_a_port_left_in_time_wait(
    tmp_path: Path,
    gateway_factory: GatewayFactory,
    embedded_path: Path,
    environment: str,
) -> None:
    first = await gateway_factory(store=str(embedded_path), environment=environment)
    for _ in range(3):
        answer = await asyncio.to_thread(_closed_by_server, first.port)
        assert answer.startswith(b"HTTP/1.1 404 ")
    assert first.stop() == 0

    args = [sys.executable, "-m", "gateway", "--store", str(embedded_path)]
    args += ["--environment", environment, "--port", str(first.port)]
    args += ["--admin-port", str(free_port())]
    again = ServiceProcess(args, tmp_path / "again.log", {})
    try:
        await again.wait_http(
            f"http://127.0.0.1:{args[-1]}/readyz", lambda status: status == 200
        )
        answer = await asyncio.to_thread(_closed_by_server, first.port)
        assert answer.startswith(b"HTTP/1.1 404 ")
    finally:
        assert again.stop() == 0
