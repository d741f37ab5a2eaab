"""The command line: every flag also comes from its AGW_* environment variable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gateway.cli import GatewaySettings, parse_settings
from tests.fixtures.stack import ROOT

ENV = ["--environment", "dev"]


def test_cli_flags_override_environment_variables() -> None:
    settings = parse_settings(
        ["--environment", "dev", "--admin-port", "7001"],
        {"AGW_ADMIN_PORT": "7000", "AGW_WORKERS": "3", "AGW_ACCESS_LOG": "true"},
    )
    assert settings == GatewaySettings(
        store="./.agw-data",
        environment="dev",
        admin_port=7001,
        workers=3,
        access_log=True,
    )


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--max-header-count", " 250 ", 250),
        ("--keepalive-s", "2.5", 2.5),
        ("--keepalive-s", ".5", 0.5),
        ("--keepalive-s", "3.", 3.0),
        ("--drain-grace-s", "0", 0.0),
        ("--upstream-idle-timeout-s", "0.25", 0.25),
    ],
)
def test_cli_numbers_as_operators_write_them(
    flag: str, value: str, expected: float
) -> None:
    settings = parse_settings([*ENV, flag, value], {})
    assert getattr(settings, flag[2:].replace("-", "_")) == expected


def test_cli_environment_variables_alone_suffice() -> None:
    settings = parse_settings(
        [],
        {
            "AGW_STORE": "redis://127.0.0.1:6379/0",
            "AGW_ENVIRONMENT": "prod",
            "AGW_MAX_HEADER_SIZE": "32768",
            "AGW_MAX_HEADER_COUNT": "250",
            "AGW_KEEPALIVE_S": "5",
            "AGW_SEND_TIMEOUT_S": "0.5",
            "AGW_DRAIN_GRACE_S": "2.5",
            "AGW_LOG_LEVEL": "debug",
            "AGW_UPSTREAM_IDLE_TIMEOUT_S": "1.5",
        },
    )
    assert settings.store == "redis://127.0.0.1:6379/0"
    assert settings.environment == "prod"
    assert settings.max_header_size == 32768
    assert settings.max_header_count == 250
    assert (settings.keepalive_s, settings.send_timeout_s) == (5.0, 0.5)
    assert settings.drain_grace_s == 2.5
    assert settings.log_level == "DEBUG"
    assert settings.upstream_idle_timeout_s == 1.5


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        ([], {}, False),
        (["--access-log"], {}, True),
        (["--no-access-log"], {"AGW_ACCESS_LOG": "1"}, False),
        (["--access-log"], {"AGW_ACCESS_LOG": "no"}, True),
        *(([], {"AGW_ACCESS_LOG": value}, True) for value in ("1", "true", "YES")),
        *(([], {"AGW_ACCESS_LOG": value}, False) for value in ("0", "false", "no")),
    ],
)
def test_cli_access_log_is_a_switch(
    argv: list[str], environ: dict[str, str], expected: bool
) -> None:
    assert parse_settings(ENV + argv, environ).access_log is expected


@pytest.mark.parametrize(
    ("argv", "port", "admin_port"),
    [(["--port", "0", "--admin-port", "65535"], 0, 65535), ([], 8080, 9901)],
)
def test_cli_accepts_every_port(argv: list[str], port: int, admin_port: int) -> None:
    settings = parse_settings(ENV + argv, {})
    assert (settings.port, settings.admin_port) == (port, admin_port)


@pytest.mark.parametrize(
    ("argv", "environ", "error"),
    [
        (["--port", "99999"], {}, "argument --port: not a port (0 to 65535): '99999'"),
        (["--port", "abc"], {}, "argument --port: not a port (0 to 65535): 'abc'"),
        (
            ["--admin-port", "-1"],
            {},
            "argument --admin-port: not a port (0 to 65535): '-1'",
        ),
        (["--workers", "0"], {}, "argument --workers: not a whole number from 1: '0'"),
        (
            ["--max-header-size", "-5"],
            {},
            "argument --max-header-size: not a whole number from 1024 to 1048576: '-5'",
        ),
        (
            ["--max-header-size", "4294967296"],
            {},
            "argument --max-header-size: not a whole number from 1024 to 1048576: "
            "'4294967296'",
        ),
        (
            ["--max-header-count", "7"],
            {},
            "argument --max-header-count: not a whole number from 8 to 10000: '7'",
        ),
        (
            [],
            {"AGW_MAX_HEADER_COUNT": "10001"},
            "AGW_MAX_HEADER_COUNT: not a whole number from 8 to 10000: '10001'",
        ),
        (
            ["--drain-grace-s", "-1"],
            {},
            "argument --drain-grace-s: not a number of seconds, 0 or more: '-1'",
        ),
        (
            ["--keepalive-s", "0"],
            {},
            "argument --keepalive-s: not a number of seconds, more than 0: '0'",
        ),
        (
            [],
            {"AGW_SEND_TIMEOUT_S": "-1"},
            "AGW_SEND_TIMEOUT_S: not a number of seconds, more than 0: '-1'",
        ),
        (
            ["--header-timeout-s", "0"],
            {},
            "argument --header-timeout-s: not a number of seconds, more than 0: '0'",
        ),
        *(
            (
                ["--header-timeout-s", value],
                {},
                "argument --header-timeout-s: not a number of seconds, more than 0: "
                f"{value!r}",
            )
            for value in ("-1", "nan", "inf", "soon", "")
        ),
        (
            [],
            {"AGW_HEADER_TIMEOUT_S": "-0.5"},
            "AGW_HEADER_TIMEOUT_S: not a number of seconds, more than 0: '-0.5'",
        ),
        (
            ["--drain-grace-s", "nan"],
            {},
            "argument --drain-grace-s: not a number of seconds, 0 or more: 'nan'",
        ),
        (
            ["--drain-grace-s", "inf"],
            {},
            "argument --drain-grace-s: not a number of seconds, 0 or more: 'inf'",
        ),
        *(
            (
                ["--max-header-count", value],
                {},
                "argument --max-header-count: not a whole number from 8 to 10000: "
                f"{value!r}",
            )
            for value in ("+100", "1_000", "\u0661\u0660\u0660", "100.0", "1e2", "")
        ),
        *(
            (
                ["--keepalive-s", value],
                {},
                "argument --keepalive-s: not a number of seconds, more than 0: "
                f"{value!r}",
            )
            for value in ("+5", "1_0", "1e3", "\u0665", "5 s")
        ),
        (
            ["--upstream-connection-limit", "-3"],
            {},
            "argument --upstream-connection-limit: not a whole number from 0: '-3'",
        ),
        *(
            (
                ["--upstream-idle-timeout-s", value],
                {},
                "argument --upstream-idle-timeout-s: not a number of seconds, "
                f"more than 0: {value!r}",
            )
            for value in ("0", "-1", "inf", "nan", "4s")
        ),
        (
            ["--log-level", "foo"],
            {},
            "argument --log-level: not one of DEBUG, INFO, WARNING, ERROR: 'foo'",
        ),
        (
            ["--environment", "Dev"],
            {},
            "argument --environment: not a name (1 to 63 of a-z, 0-9 and -, "
            "a letter or digit at each end): 'Dev'",
        ),
        (["--store", ""], {}, "argument --store: must not be empty"),
        ([], {"AGW_PORT": "99999"}, "AGW_PORT: not a port (0 to 65535): '99999'"),
        ([], {"AGW_WORKERS": "-2"}, "AGW_WORKERS: not a whole number from 1: '-2'"),
        (
            [],
            {"AGW_ACCESS_LOG": "maybe"},
            "AGW_ACCESS_LOG: not a boolean (1/0, true/false, yes/no): 'maybe'",
        ),
        (
            [],
            {"AGW_LOG_LEVEL": "loud"},
            "AGW_LOG_LEVEL: not one of DEBUG, INFO, WARNING, ERROR: 'loud'",
        ),
    ],
)
def test_cli_rejects_missing_or_bad_values(
    argv: list[str],
    environ: dict[str, str],
    error: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_settings(argv, {"AGW_ENVIRONMENT": "dev", **environ})
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m gateway: error: {error}"
    )


def test_cli_bad_variable_prints_the_whole_usage_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        parse_settings(["--port", "x"], {"AGW_ENVIRONMENT": "dev"})
    usage = capsys.readouterr().err.splitlines()[:-1]

    with pytest.raises(SystemExit) as exit_:
        parse_settings([], {"AGW_ENVIRONMENT": "dev", "AGW_WORKERS": "x"})
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        *usage,
        "python -m gateway: error: AGW_WORKERS: not a whole number from 1: 'x'",
    ]
    assert " ".join(usage).endswith(
        "[--upstream-idle-timeout-s UPSTREAM_IDLE_TIMEOUT_S]"
    )


def test_cli_requires_an_environment(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_settings([], {})
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "python -m gateway: error: the following arguments are required: --environment"
    )


def test_cli_bad_value_is_a_usage_error_not_a_traceback() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "--environment", "dev", "--log-level", "foo"],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("AGW_")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        "python -m gateway: error: argument --log-level: "
        "not one of DEBUG, INFO, WARNING, ERROR: 'foo'"
    )
    assert "Traceback" not in done.stderr
