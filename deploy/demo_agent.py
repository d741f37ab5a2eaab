"""A small demo agent: answers JSON on POST /chat and streams SSE on /stream.

Run: ``python deploy/demo_agent.py --port 9000``. It stands in for a
platform-hosted agent when trying the gateway out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json

from aiohttp import web

__all__ = ["create_app"]

WORDS = ("Hello", "from", "the", "demo", "agent,", "streamed", "through", "the")


async def chat(request: web.Request) -> web.Response:
    body = await request.read()
    try:
        message = json.loads(body or b"{}").get("message", "")
    except (ValueError, AttributeError):
        error = {"error": "bad_request", "message": "body must be a JSON object"}
        return web.json_response(error, status=400)
    return web.json_response(
        {
            "reply": f"You said: {message}",
            "subject": request.headers.get("X-Auth-Subject"),
            "api_key_name": request.headers.get("X-Auth-Api-Key-Name"),
        }
    )


async def stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    # A caller may leave before the end; nobody is then left to tell.
    with contextlib.suppress(ConnectionResetError):
        await _events(response)
    return response


async def _events(response: web.StreamResponse) -> None:
    for index, word in enumerate((*WORDS, "gateway.")):
        event = json.dumps({"index": index, "token": word})
        await response.write(f"event: token\ndata: {event}\n\n".encode())
        await asyncio.sleep(0.2)
    await response.write(b"event: done\ndata: {}\n\n")
    await response.write_eof()


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/chat", chat)
    app.router.add_route("*", "/stream", stream)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    web.run_app(create_app(), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
