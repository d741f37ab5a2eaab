"""The control plane deploying to a real gateway process on the same store."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from controlplane.app import create_app
from gateway.store import open_store
from tests.controlplane.conftest import AUTH, TOKEN

Server = Callable[..., Awaitable[TestServer]]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """A gateway process for ``dev`` on an embedded store; (store, traffic URL)."""
    store, port, admin = str(tmp_path / "store"), _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGW_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "--store", store, "--environment", "dev",
        "--port", str(port), "--admin-port", str(admin),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await _until_ready(f"http://127.0.0.1:{admin}/readyz")
        yield store, f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)


async def _until_ready(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never became ready")


async def test_end_to_end_deploy_reaches_gateway_and_undeploy_removes_it(
    gateway: tuple[str, str], aiohttp_server: Server
) -> None:
    location, traffic = gateway

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path})

    agent_app = web.Application()
    agent_app.router.add_get("/hello", hello)
    agent = await aiohttp_server(agent_app)

    store = open_store(location)
    server = TestServer(create_app(store, TOKEN))
    await server.start_server()
    api = f"http://127.0.0.1:{server.port}/api/v1"
    try:
        async with aiohttp.ClientSession(headers=AUTH) as http:
            for method, path, body in [
                ("PUT", "/environments/dev", {"gateway_url": traffic}),
                ("PUT", "/projects/shop", {}),
                ("PUT", "/projects/shop/agents/helper", {"upstream_url": f"http://127.0.0.1:{agent.port}"}),
            ]:  # fmt: skip
                async with http.request(method, api + path, json=body) as response:
                    assert response.status == 201

            deploy = {"environment": "dev", "endpoint_auth": {"type": "none"}}
            url = api + "/projects/shop/agents/helper/deployments"
            async with http.post(url + "?wait=10", json=deploy) as response:
                answer = await response.json()
            assert response.status == 201
            assert answer["invoke_url"] == f"{traffic}/shop/helper"
            assert answer["propagation"]["pending"] == []
            assert answer["propagation"]["live"] >= 1

            async with http.get(answer["invoke_url"] + "/hello") as response:
                assert response.status == 200
                assert await response.json() == {"path": "/hello"}

            async with http.delete(url + "/dev?wait=10") as response:
                assert response.status == 200
                assert (await response.json())["propagation"]["pending"] == []
            async with http.get(answer["invoke_url"] + "/hello") as response:
                assert response.status == 404
    finally:
        await server.close()
        await store.close()
