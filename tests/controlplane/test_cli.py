"""``python -m controlplane`` as a real process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from controlplane.cli import parse_args, read_admin_token
from tests.fixtures.stack import free_port

TOKEN = "cli-admin-token-5f2a9c"


def _environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("AGW_")}


def _command(store: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "controlplane", "--store", str(store), *extra]


def test_cli_without_admin_token_exits_with_how_to_give_one(tmp_path: Path) -> None:
    done = subprocess.run(
        _command(tmp_path / "store"),
        env=_environ(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "no admin token" in done.stderr
    assert "--admin-token-file" in done.stderr
    assert "AGW_ADMIN_TOKEN" in done.stderr


def test_cli_serves_with_token_file_and_stops_on_sigterm(tmp_path: Path) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n")
    env = {**_environ(), "AGW_ADMIN_TOKEN_FILE": str(token_file), "AGW_PORT": "0"}
    process = subprocess.Popen(
        _command(tmp_path / "store"),
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        url = re.search(r"listening on (http://\S+/api/v1)", line)
        assert url is not None, line
        assert "store: embedded" in line

        request = urllib.request.Request(
            url.group(1) + "/environments", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
            assert json.loads(response.read()) == {"environments": []}
    finally:
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=30)

    assert process.returncode == 0
    assert "control plane stopped" in rest
    assert TOKEN not in line + rest


def _run(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controlplane", *args],
        env={**_environ(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _token_file(tmp_path: Path, token: str) -> Path:
    path = tmp_path / f"{token}.txt"
    path.write_text(token + "\n")
    return path


@pytest.mark.parametrize(
    ("argv", "variables", "expected"),
    [
        (["--admin-token", "from-flag"], {"AGW_ADMIN_TOKEN_FILE": "file"}, "from-flag"),
        (["--admin-token", "from-flag"], {"AGW_ADMIN_TOKEN": "variable"}, "from-flag"),
        (["--admin-token-file", "file"], {"AGW_ADMIN_TOKEN": "variable"}, "file"),
        (["--admin-token-file", "file"], {"AGW_ADMIN_TOKEN_FILE": "other"}, "file"),
        ([], {"AGW_ADMIN_TOKEN_FILE": "file"}, "file"),
        ([], {"AGW_ADMIN_TOKEN": "variable"}, "variable"),
    ],
)
def test_cli_admin_token_flag_wins_over_either_variable(
    tmp_path: Path, argv: list[str], variables: dict[str, str], expected: str
) -> None:
    files = {name: str(_token_file(tmp_path, name)) for name in ("file", "other")}
    argv = [files.get(arg, arg) for arg in argv]
    environ = {k: files.get(v, v) for k, v in variables.items()}
    assert read_admin_token(parse_args(argv, environ)) == expected


@pytest.mark.parametrize(
    ("argv", "environ", "error"),
    [
        (
            ["--admin-token-file", "f", "--admin-token", "t"],
            {},
            "argument --admin-token: not allowed with argument --admin-token-file",
        ),
        (
            [],
            {"AGW_ADMIN_TOKEN_FILE": "f", "AGW_ADMIN_TOKEN": "t"},
            "AGW_ADMIN_TOKEN_FILE and AGW_ADMIN_TOKEN are both set: unset one, "
            "or give --admin-token-file or --admin-token",
        ),
        (["--port", "abc"], {}, "argument --port: not a port (0 to 65535): 'abc'"),
        (["--port", "65536"], {}, "argument --port: not a port (0 to 65535): '65536'"),
        ([], {"AGW_PORT": "-1"}, "AGW_PORT: not a port (0 to 65535): '-1'"),
        (
            ["--log-level", "foo"],
            {},
            "argument --log-level: not one of DEBUG, INFO, WARNING, ERROR: 'foo'",
        ),
        (
            [],
            {"AGW_LOG_LEVEL": "verbose"},
            "AGW_LOG_LEVEL: not one of DEBUG, INFO, WARNING, ERROR: 'verbose'",
        ),
    ],
)
def test_cli_rejects_ambiguous_or_bad_values(
    argv: list[str],
    environ: dict[str, str],
    error: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv, environ)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m controlplane: error: {error}"
    )


def test_cli_bad_variable_prints_the_whole_usage_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--port", "x"], {})
    usage = capsys.readouterr().err.splitlines()[:-1]

    with pytest.raises(SystemExit) as exit_:
        parse_args([], {"AGW_PORT": "x"})
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        *usage,
        "python -m controlplane: error: AGW_PORT: not a port (0 to 65535): 'x'",
    ]
    assert " ".join(usage).endswith(
        "[--admin-token-file ADMIN_TOKEN_FILE | --admin-token ADMIN_TOKEN]"
    )


def test_cli_bad_port_is_a_usage_error_not_a_traceback(tmp_path: Path) -> None:
    done = _run("--admin-token", TOKEN, "--port", "abc")
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        "python -m controlplane: error: argument --port: not a port (0 to 65535): 'abc'"
    )
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("store", "reason"),
    [
        ("/proc/agw-store", "No such file or directory"),
        ("file/store", "Not a directory"),
    ],
)
def test_cli_refuses_an_embedded_store_it_cannot_create(
    tmp_path: Path, store: str, reason: str
) -> None:
    (tmp_path / "file").write_text("a regular file\n")
    location = store if store.startswith("/") else str(tmp_path / store)

    done = _run("--store", location, "--admin-token", TOKEN, "--port", "0")

    assert done.returncode == 2
    assert done.stderr == (
        f"controlplane: cannot create the store directory {location}: {reason}\n"
    )


def test_cli_on_unreachable_redis_starts_and_logs_why(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    store = f"redis://:redis-password-4e1b@127.0.0.1:{port}/0"
    process = subprocess.Popen(
        [sys.executable, "-m", "controlplane", "--store", store, "--port", "0"],
        env={**_environ(), "AGW_ADMIN_TOKEN": TOKEN},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        start = ""
        while "listening" not in start and process.poll() is None:
            start += process.stderr.readline()
        url = re.search(r"listening on (http://\S+/api/v1)", start)
        assert url is not None, start
        request = urllib.request.Request(
            url.group(1) + "/environments", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=30)
        answer.value.close()
        assert answer.value.code == 503
    finally:
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=30)

    refused = f"redis: Error 111 connecting to 127.0.0.1:{port}. Connection refused."
    assert f"store unavailable ({refused}): answering 503 until it is back" in start
    assert f"store unavailable during /api/v1/environments: {refused}" in rest
    assert "redis-password-4e1b" not in start + rest
