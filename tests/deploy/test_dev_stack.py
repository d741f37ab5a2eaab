"""The dev stack: started, then stopped by a signal to its process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.ports import free_port

ROOT = Path(__file__).resolve().parents[2]

# A background job of a non-interactive shell starts with SIGINT ignored.
AS_BACKGROUND_JOB = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait_for_summary(stack: subprocess.Popen[str]) -> str:
    assert stack.stdout is not None
    lines = []
    for line in stack.stdout:
        lines.append(line)
        if line.startswith("Ctrl-C stops everything."):
            return "".join(lines)
    raise AssertionError(f"dev-stack ended before it was ready: {''.join(lines)}")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=str)
def test_dev_stack_stops_everything_on_a_signal_to_its_group(
    tmp_path: Path, signum: signal.Signals
) -> None:
    ports = {
        name: free_port() for name in ("gateway", "management", "controlplane", "agent")
    }
    flags = [f for name, port in ports.items() for f in (f"--{name}-port", str(port))]
    command = [sys.executable, "-c", AS_BACKGROUND_JOB, "deploy/dev_stack.py"]
    stack = subprocess.Popen(
        [*command, "--data-dir", str(tmp_path / "data"), *flags],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for_summary(stack)
        assert all(_listening(port) for port in ports.values())

        os.killpg(stack.pid, signum)
        stdout, stderr = stack.communicate(timeout=30)
    finally:
        if stack.poll() is None:
            os.killpg(stack.pid, signal.SIGKILL)
            stack.wait()

    assert (stack.returncode, stdout, stderr) == (0, "", "")
    assert [port for port in ports.values() if _listening(port)] == []
    assert _group_gone(stack.pid)
    logs = {log.name: log.read_text() for log in (tmp_path / "data").glob("*.log")}
    assert sorted(logs) == ["controlplane.log", "demo-agent.log", "gateway.log"]
    assert [name for name, text in logs.items() if "Traceback" in text] == []


def _group_gone(pgid: int, within_s: float = 5.0) -> bool:
    """Whether every process of the group has ended (helpers may lag a little)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False
