"""Command line of ``python -m gateway``: flags, their environment variables, start."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence

import msgspec

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
    header_timeout_s: float = 30.0
    drain_grace_s: float = 30.0
    log_level: str = "INFO"
    access_log: bool = False
    upstream_connection_limit: int = 0


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env_name(name: str) -> str:
    return "AGW_" + name.upper()


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {value!r}")


_HELP = {
    "store": "Redis URL (redis://, rediss://, unix://) or embedded-store directory",
    "environment": "the environment whose policies this gateway enforces",
    "host": "address of the traffic port",
    "port": "traffic port, shared by every worker",
    "admin_host": "address of the management port",
    "admin_port": "management port: /healthz, /readyz, /metrics",
    "workers": "number of worker processes",
    "max_header_size": "longest accepted request header line, in bytes",
    "header_timeout_s": "seconds a caller may take to send a request head",
    "drain_grace_s": "seconds in-flight requests may finish after SIGTERM",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "access_log": "log one line per request (true/false)",
    "upstream_connection_limit": "pooled upstream connections per worker, 0: no cap",
}


def _parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gateway",
        description="Agent Gateway data plane. Every flag also reads AGW_<FLAG>.",
    )
    defaults: dict[str, object] = {"store": "./.agw-data"}
    for field in msgspec.structs.fields(GatewaySettings):
        default = environ.get(_env_name(field.name), defaults.get(field.name))
        if field.default is not msgspec.NODEFAULT:
            default = environ.get(_env_name(field.name), field.default)
        kind = _bool if field.type is bool else field.type
        parser.add_argument(
            _flag(field.name),
            dest=field.name,
            type=kind,
            default=default,
            required=default is None,
            help=f"{_HELP[field.name]} (env {_env_name(field.name)})",
        )
    return parser


def parse_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> GatewaySettings:
    """Settings from flags, falling back to AGW_* variables, then defaults."""
    env = os.environ if environ is None else environ
    parser = _parser(env)
    args = parser.parse_args(argv)

    # argparse converts string defaults (those read from AGW_*) with `type`.
    settings = GatewaySettings(**vars(args))
    if settings.workers < 1:
        parser.error("--workers must be at least 1")
    return settings


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
