"""The command line: every flag also comes from its AGW_* environment variable."""

from __future__ import annotations

import pytest

from gateway.cli import GatewaySettings, parse_settings


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


def test_cli_environment_variables_alone_suffice() -> None:
    settings = parse_settings(
        [],
        {
            "AGW_STORE": "redis://127.0.0.1:6379/0",
            "AGW_ENVIRONMENT": "prod",
            "AGW_MAX_HEADER_SIZE": "32768",
            "AGW_DRAIN_GRACE_S": "2.5",
        },
    )
    assert settings.store == "redis://127.0.0.1:6379/0"
    assert settings.environment == "prod"
    assert settings.max_header_size == 32768
    assert settings.drain_grace_s == 2.5


@pytest.mark.parametrize(
    "argv", [[], ["--environment", "dev", "--workers", "0"], ["--port", "x"]]
)
def test_cli_rejects_missing_or_bad_values(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_settings(argv, {})
    assert exit_.value.code == 2
