"""``python -m controlplane`` as a real process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

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
