"""Command line of ``python -m gateway``: flags, their environment variables, start."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec
from msgspec.structs import FieldInfo

from gateway import flags
from gateway.traffic import KEEPALIVE_S, MAX_HEADER_COUNT, SEND_TIMEOUT_S
from gateway.upstream import IDLE_TIMEOUT_S

__all__ = ["GatewaySettings", "main", "parse_settings"]


class GatewaySettings(msgspec.Struct, frozen=True, kw_only=True):
    """How a gateway (its supervisor and every worker) runs."""

    store: str
    environment: str
    host: str = "127.0.0.1"
    port: int = 8080
    admin_host: str = "127.0.0.1"
    admin_port: int = 9901
    workers: int = 1
    max_header_size: int = 16384
    max_header_count: int = MAX_HEADER_COUNT
    header_timeout_s: float = 30.0
    keepalive_s: float = KEEPALIVE_S
    send_timeout_s: float = SEND_TIMEOUT_S
    drain_grace_s: float = 30.0
    log_level: str = "INFO"
    access_log: bool = False
    upstream_connection_limit: int = 0
    upstream_idle_timeout_s: float = IDLE_TIMEOUT_S


#: The range of --max-header-size: a JWT must fit, and so must the parser's limits.
MAX_HEADER_SIZES = (1024, 1024 * 1024)

#: The range of --max-header-count: Host and a credential must fit.
MAX_HEADER_COUNTS = (8, 10_000)

_DEFAULTS: dict[str, object] = {"store": "./.agw-data"}

_TYPES: dict[str, Callable[[str], object]] = {
    "store": flags.text,
    "environment": flags.environment_name,
    "host": flags.text,
    "port": flags.port,
    "admin_host": flags.text,
    "admin_port": flags.port,
    "workers": flags.count(1),
    "max_header_size": flags.count(*MAX_HEADER_SIZES),
    "max_header_count": flags.count(*MAX_HEADER_COUNTS),
    "header_timeout_s": flags.positive_seconds,
    "keepalive_s": flags.positive_seconds,
    "send_timeout_s": flags.positive_seconds,
    "drain_grace_s": flags.seconds,
    "log_level": flags.log_level,
    "access_log": flags.boolean,
    "upstream_connection_limit": flags.count(0),
    "upstream_idle_timeout_s": flags.positive_seconds,
}

_HELP = {
    "store": "Redis URL (redis://, rediss://, unix://) or embedded-store directory",
    "environment": "the environment whose policies this gateway enforces",
    "host": "address of the traffic port",
    "port": "traffic port, shared by every worker",
    "admin_host": "address of the management port",
    "admin_port": "management port: /healthz, /readyz, /metrics",
    "workers": "number of worker processes",
    "max_header_size": "longest accepted request header line, in bytes",
    "max_header_count": "most header lines a request head may hold",
    "header_timeout_s": "seconds a caller may take to send a request head",
    "keepalive_s": "seconds an idle keep-alive connection stays open",
    "send_timeout_s": "seconds a caller may leave the gateway's answer unread",
    "drain_grace_s": "seconds in-flight requests may finish after SIGTERM",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "access_log": "log one line per request",
    "upstream_connection_limit": "pooled upstream connections per worker, 0: no cap",
    "upstream_idle_timeout_s": "seconds a pooled upstream connection may stay idle",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env_name(name: str) -> str:
    return "AGW_" + name.upper()


def _fallback(field: FieldInfo) -> object:
    """The flag's default; None when it has none (the flag is then required)."""
    if field.default is not msgspec.NODEFAULT:
        return field.default
    return _DEFAULTS.get(field.name)


def _default(environ: Mapping[str, str], field: FieldInfo) -> object:
    """The flag's AGW_* variable, else its default; None when it has neither.

    A bad variable raises :class:`argparse.ArgumentTypeError` naming it.
    """
    value = flags.from_environment(environ, _env_name(field.name), _TYPES[field.name])
    return _fallback(field) if value is None else value


def _parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gateway",
        description="Agent Gateway data plane. Every flag also reads AGW_<FLAG>.",
    )
    problems: list[str] = []
    for field in msgspec.structs.fields(GatewaySettings):
        try:
            default = _default(environ, field)
        except argparse.ArgumentTypeError as exc:
            problems.append(str(exc))
            default = _fallback(field)
        _add_flag(parser, field, default)
    if problems:
        # Only once every flag is added: the usage line printed names them all.
        parser.error(problems[0])
    return parser


def _add_flag(
    parser: argparse.ArgumentParser, field: FieldInfo, default: object
) -> None:
    options: dict[str, Any] = {"type": _TYPES[field.name]}
    if field.type is bool:
        options = {"action": argparse.BooleanOptionalAction}
    parser.add_argument(
        _flag(field.name),
        dest=field.name,
        default=default,
        required=default is None,
        help=f"{_HELP[field.name]} (env {_env_name(field.name)})",
        **options,
    )


def parse_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> GatewaySettings:
    """Settings from flags, falling back to AGW_* variables, then defaults.

    A bad value, of a flag or of its variable, is a usage error (exit code 2)
    that names it.
    """
    env = os.environ if environ is None else environ
    args = _parser(env).parse_args(argv)
    return GatewaySettings(**vars(args))


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
    )


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    configure_logging(settings.log_level)

    from gateway.supervisor import run_supervisor

    return run_supervisor(settings)
