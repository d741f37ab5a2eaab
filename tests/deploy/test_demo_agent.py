"""The demo agent: its event stream, whole or left early."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from deploy.demo_agent import create_app

ServerFactory = Callable[..., Awaitable[TestServer]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

FIRST = b'event: token\ndata: {"index": 0, "token": "Hello"}\n\n'


class Outcomes:
    """A middleware telling how each handler ended: returned, or what it raised."""

    def __init__(self) -> None:
        self.ended: asyncio.Queue[str] = asyncio.Queue()

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        try:
            response = await handler(request)
        except BaseException as exc:
            self.ended.put_nowait(type(exc).__name__)
            raise
        self.ended.put_nowait("returned")
        return response


@pytest.fixture
async def outcomes() -> AsyncIterator[tuple[str, Outcomes]]:
    """The demo agent served as ``web.run_app`` serves it, and its outcomes.

    The test server cancels the handler of a caller who leaves; ``run_app``
    does not, so there the handler meets the closed connection itself.
    """
    seen = Outcomes()
    app = create_app()
    app.middlewares.append(seen.middleware)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}", seen
    await runner.cleanup()


async def test_demo_agent_stream_ends_quietly_when_the_caller_leaves(
    outcomes: tuple[str, Outcomes],
) -> None:
    url, seen = outcomes
    async with aiohttp.ClientSession() as session:
        response = await session.get(url + "/stream")
        first = await response.content.readuntil(b"\n\n")
        response.close()  # leave after the first event

    assert first == FIRST
    assert await asyncio.wait_for(seen.ended.get(), timeout=5) == "returned"


async def test_demo_agent_stream_sends_every_word_then_done(
    aiohttp_server: ServerFactory,
) -> None:
    server = await aiohttp_server(create_app())
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.make_url("/stream")) as response,
    ):
        body = await response.text()

    events = body.split("\n\n")
    assert (response.status, response.content_type) == (200, "text/event-stream")
    assert events[0] + "\n\n" == FIRST.decode()
    assert events[-3:] == [
        'event: token\ndata: {"index": 8, "token": "gateway."}',
        "event: done\ndata: {}",
        "",
    ]
