"""``python -m controlplane``: serve the control-plane API on one store.

Every flag can also be given as an environment variable: ``--admin-token-file``
is ``AGW_ADMIN_TOKEN_FILE``, ``--port`` is ``AGW_PORT``, and so on.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import uvloop
from aiohttp import web

from controlplane.app import create_app
from gateway.log import controlplane_log
from gateway.store import open_store

__all__ = ["main", "parse_args", "read_admin_token", "store_kind"]

_HOW_TO_CONFIGURE = (
    "controlplane: no admin token. Give one with --admin-token-file FILE "
    "(or AGW_ADMIN_TOKEN_FILE), or --admin-token TOKEN (or AGW_ADMIN_TOKEN)."
)


def _env(flag: str) -> str:
    return "AGW_" + flag.removeprefix("--").replace("-", "_").upper()


def _add(
    parser: argparse.ArgumentParser, flag: str, default: str | None, help: str
) -> None:
    parser.add_argument(
        flag, default=os.environ.get(_env(flag), default), help=f"{help} [{_env(flag)}]"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m controlplane", description="Agent Gateway control plane"
    )
    _add(parser, "--store", "./.agw-data", "Redis URL or embedded-store directory")
    _add(parser, "--admin-token-file", None, "file holding the admin token")
    _add(parser, "--admin-token", None, "the admin token itself")
    _add(parser, "--host", "127.0.0.1", "address to listen on")
    _add(parser, "--port", "8081", "port to listen on (0: any free port)")
    _add(parser, "--log-level", "INFO", "DEBUG, INFO, WARNING or ERROR")
    return parser.parse_args(argv)


def read_admin_token(args: argparse.Namespace) -> str | None:
    """The admin token from its file, else from the flag; None when neither."""
    if args.admin_token_file:
        return Path(args.admin_token_file).read_text().strip() or None
    token: str | None = args.admin_token
    return token.strip() or None if token else None


def store_kind(location: str) -> str:
    """What to log about the store: never a Redis URL, which may hold a password."""
    if location.startswith(("redis://", "rediss://", "unix://")):
        return "redis"
    return f"embedded ({location})"


async def serve(args: argparse.Namespace, token: str) -> None:
    store = open_store(args.store)
    runner = web.AppRunner(create_app(store, token), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, args.host, int(args.port))
        await site.start()
        controlplane_log.info(
            "control plane listening on %s/api/v1 (store: %s)",
            _url(runner, args.host), store_kind(args.store),
        )  # fmt: skip
        await _until_signalled()
    finally:
        await runner.cleanup()
        await store.close()
        controlplane_log.info("control plane stopped")


def _url(runner: web.AppRunner, host: str) -> str:
    """The address actually bound, so that ``--port 0`` shows its port."""
    port = runner.addresses[0][1]
    return f"http://{host}:{port}"


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        token = read_admin_token(args)
    except OSError as error:
        sys.exit(f"controlplane: cannot read the admin token file: {error.strerror}")
    if token is None:
        sys.exit(_HOW_TO_CONFIGURE)
    uvloop.run(serve(args, token))
