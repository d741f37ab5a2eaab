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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import uvloop
from aiohttp import web

from controlplane.app import ApiRunner, create_app
from gateway import flags
from gateway.log import controlplane_log
from gateway.store import Store, StoreUnavailable, open_store

__all__ = [
    "embedded_store_problem",
    "main",
    "parse_args",
    "read_admin_token",
    "store_kind",
]

#: How long the start waits for the store's first answer.
_STORE_CHECK_S = 5.0

_HOW_TO_CONFIGURE = (
    "controlplane: no admin token. Give one with --admin-token-file FILE "
    "(or AGW_ADMIN_TOKEN_FILE), or --admin-token TOKEN (or AGW_ADMIN_TOKEN)."
)

#: Exit code when the process cannot start as configured (argparse's too).
USAGE_ERROR = 2

#: Each flag but the admin token's, with its parser and default.
_FLAGS: dict[str, tuple[Callable[[str], object], object, str]] = {
    "--store": (flags.text, "./.agw-data", "Redis URL or embedded-store directory"),
    "--host": (flags.text, "127.0.0.1", "address to listen on"),
    "--port": (flags.port, 8081, "port to listen on (0: any free port)"),
    "--log-level": (flags.log_level, "INFO", "DEBUG, INFO, WARNING or ERROR"),
}


def _env(flag: str) -> str:
    return "AGW_" + flag.removeprefix("--").replace("-", "_").upper()


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m controlplane", description="Agent Gateway control plane"
    )
    for flag, (parse, default, help) in _FLAGS.items():
        parser.add_argument(flag, type=parse, help=f"{help} [{_env(flag)}; {default}]")
    token = parser.add_mutually_exclusive_group()
    token.add_argument(
        "--admin-token-file", help="file holding the admin token [AGW_ADMIN_TOKEN_FILE]"
    )
    token.add_argument("--admin-token", help="the admin token itself [AGW_ADMIN_TOKEN]")
    return parser


def parse_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> argparse.Namespace:
    """Flags, then their AGW_* variables, then defaults; a bad value exits 2."""
    env = os.environ if environ is None else environ
    parser = _parser()
    args = parser.parse_args(argv)
    for flag, (parse, default, _) in _FLAGS.items():
        if getattr(args, _dest(flag)) is None:
            try:
                value = flags.from_environment(env, _env(flag), parse)
            except argparse.ArgumentTypeError as exc:
                parser.error(str(exc))
            setattr(args, _dest(flag), default if value is None else value)
    _admin_token_source(parser, args, env)
    return args


def _admin_token_source(
    parser: argparse.ArgumentParser, args: argparse.Namespace, env: Mapping[str, str]
) -> None:
    """Either flag wins over both variables; two variables are ambiguous."""
    if args.admin_token_file is not None or args.admin_token is not None:
        return
    token_file = env.get("AGW_ADMIN_TOKEN_FILE") or None
    token = env.get("AGW_ADMIN_TOKEN") or None
    if token_file is not None and token is not None:
        parser.error(
            "AGW_ADMIN_TOKEN_FILE and AGW_ADMIN_TOKEN are both set: unset one, "
            "or give --admin-token-file or --admin-token"
        )
    args.admin_token_file, args.admin_token = token_file, token


def read_admin_token(args: argparse.Namespace) -> str | None:
    """The admin token from its file, else from the flag; None when neither."""
    if args.admin_token_file:
        return Path(args.admin_token_file).read_text().strip() or None
    token: str | None = args.admin_token
    return token.strip() or None if token else None


def _is_redis(location: str) -> bool:
    return location.startswith(("redis://", "rediss://", "unix://"))


def store_kind(location: str) -> str:
    """What to log about the store: never a Redis URL, which may hold a password."""
    return "redis" if _is_redis(location) else f"embedded ({location})"


def embedded_store_problem(location: str) -> str | None:
    """Why an embedded store's directory is unusable, or None when it is fine.

    Such a store is a configuration error, so the control plane refuses to
    start rather than answer 503 forever. (Redis may just not be up yet.)
    """
    directory = Path(location)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"cannot create the store directory {location}: {error.strerror}"
    if not os.access(directory, os.R_OK | os.W_OK | os.X_OK):
        return f"cannot write to the store directory {location}"
    return None


async def _check_store(store: Store) -> None:
    """Say at start why the store does not answer, if it does not."""
    try:
        async with asyncio.timeout(_STORE_CHECK_S):
            await store.get("controlplane/start")
    except (StoreUnavailable, TimeoutError) as error:
        cause = str(error) or "no answer in time"
        controlplane_log.warning(
            "store unavailable (%s): answering 503 until it is back", cause
        )


async def serve(args: argparse.Namespace, token: str) -> None:
    store = open_store(args.store)
    await _check_store(store)
    runner = ApiRunner(create_app(store, token), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, args.host, args.port)
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
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        token = read_admin_token(args)
    except OSError as error:
        sys.exit(f"controlplane: cannot read the admin token file: {error.strerror}")
    if token is None:
        sys.exit(_HOW_TO_CONFIGURE)
    problem = None if _is_redis(args.store) else embedded_store_problem(args.store)
    if problem is not None:
        print(f"controlplane: {problem}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    uvloop.run(serve(args, token))
