"""Run the whole stack on one machine for trying Agent Gateway out.

Starts the demo agent, the control plane and one gateway on the embedded
store, deploys the demo agent with API-key endpoint authentication through
the control plane, prints the admin token, the URLs and a working ``curl``,
and stops everything on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["main"]

HOST = "127.0.0.1"


class Stack:
    """The three processes of the demo stack and the admin API client."""

    def __init__(self, data_dir: Path, ports: dict[str, int]) -> None:
        self.data_dir = data_dir
        self.ports = ports
        self.token = admin_token(data_dir)
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def api(self) -> str:
        return f"http://{HOST}:{self.ports['controlplane']}/api/v1"

    @property
    def gateway(self) -> str:
        return f"http://{HOST}:{self.ports['gateway']}"

    def start(self, name: str, *args: str) -> None:
        log = open(self.data_dir / f"{name}.log", "ab")  # noqa: SIM115
        process = subprocess.Popen(
            [sys.executable, *args], stdout=log, stderr=subprocess.STDOUT
        )
        self.processes.append(process)

    def start_all(self) -> None:
        # The data directory is the store itself, so that a process started by
        # hand from here with the default --store (./.agw-data) shares it.
        store = str(self.data_dir)
        self.start(
            "demo-agent", "deploy/demo_agent.py", "--port", str(self.ports["agent"])
        )
        self.start(
            "controlplane", "-m", "controlplane", "--store", store,
            "--admin-token-file", str(self.data_dir / "admin-token"),
            "--port", str(self.ports["controlplane"]),
        )  # fmt: skip
        self.start(
            "gateway", "-m", "gateway", "--store", store,
            "--environment", "development", "--port", str(self.ports["gateway"]),
            "--admin-port", str(self.ports["management"]),
        )  # fmt: skip

    def stop(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()

    def call(self, method: str, path: str, body: object = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.api + path,
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {self.token}",
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(request, timeout=40) as response:
            return json.loads(response.read() or b"null")

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        urls = (
            f"{self.api}/environments",
            f"http://{HOST}:{self.ports['management']}/readyz",
        )
        deadline = time.monotonic() + timeout_s
        for url in urls:
            while not self.answers(url):
                self.check_alive()
                if time.monotonic() > deadline:
                    raise SystemExit(f"dev-stack: {url} did not answer; see the logs")
                time.sleep(0.2)

    def answers(self, url: str) -> bool:
        request = urllib.request.Request(
            url, headers={"Authorization": f"Bearer {self.token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=2):
                return True
        except (urllib.error.URLError, OSError):
            return False

    def check_alive(self) -> None:
        for process in self.processes:
            if process.poll() is not None:
                self.stop()
                raise SystemExit(
                    f"dev-stack: {_command(process)} exited with "
                    f"{process.returncode}; see {self.data_dir}/*.log"
                )


def _command(process: subprocess.Popen[bytes]) -> str:
    args = process.args
    if isinstance(args, str | bytes | os.PathLike):
        return os.fsdecode(args)
    return " ".join(os.fsdecode(arg) for arg in args)


def admin_token(data_dir: Path) -> str:
    """The admin token of this data directory, created on first use."""
    path = data_dir / "admin-token"
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()


def deploy_demo(stack: Stack) -> str:
    """Deploy the demo agent with an API key and return a fresh key."""
    upstream = f"http://{HOST}:{stack.ports['agent']}"
    stack.call("PUT", "/environments/development", {"gateway_url": stack.gateway})
    stack.call("PUT", "/projects/demo", {})
    stack.call("PUT", "/projects/demo/agents/assistant", {"upstream_url": upstream})
    stack.call(
        "POST",
        "/projects/demo/agents/assistant/deployments?wait=10",
        {"environment": "development", "endpoint_auth": {"type": "api_key"}},
    )
    keys = "/projects/demo/agents/assistant/environments/development/api-keys"
    try:
        created = stack.call("POST", keys, {"name": "demo"})
    except urllib.error.HTTPError as error:
        if error.code != 409:
            raise
        created = stack.call("POST", f"{keys}/demo/rotate")
    return str(created["key"])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", default=os.environ.get("AGW_DATA_DIR", ".agw-data")
    )
    for name, port in (
        ("gateway", 8080), ("management", 9901), ("controlplane", 8081), ("agent", 9000)
    ):  # fmt: skip
        parser.add_argument(f"--{name}-port", type=int, default=port)
    return parser.parse_args()


class Shutdown(Exception):
    """SIGINT or SIGTERM arrived: stop everything and exit 0."""


def _shutdown(signum: int, frame: object) -> None:
    # Once is enough: a second signal must not cut the stopping short.
    for other in (signal.SIGINT, signal.SIGTERM):
        signal.signal(other, signal.SIG_IGN)
    raise Shutdown


def main() -> None:
    args = parse_args()
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = {
        name: getattr(args, f"{name}_port")
        for name in ("gateway", "management", "controlplane", "agent")
    }
    # Installed even where SIGINT was ignored (a background job of a script):
    # the children, handling both too, would otherwise stop on their own and
    # be taken for failures. Set before they start, so they do not inherit
    # the ignored SIGINT.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _shutdown)
    stack = Stack(data_dir, ports)
    try:
        stack.start_all()
        stack.wait_ready()
        key = deploy_demo(stack)
        print_summary(stack, key)
        while True:
            stack.check_alive()
            time.sleep(1)
    except Shutdown:
        pass
    finally:
        stack.stop()


def print_summary(stack: Stack, key: str) -> None:
    invoke = f"{stack.gateway}/demo/assistant"
    print(
        f"""
Agent Gateway is running (data in {stack.data_dir}, logs in *.log there).

  admin token     {stack.token}
  control plane   {stack.api}   (OpenAPI: {stack.api}/openapi.json)
  gateway         {stack.gateway}
  management      http://{HOST}:{stack.ports["management"]}/metrics
  demo agent      {invoke}  (API key below, shown once)

Stream an answer through the gateway:

  curl -N -H 'X-API-Key: {key}' {invoke}/stream

Chat:

  curl -H 'X-API-Key: {key}' -H 'Content-Type: application/json' \\
       -d '{{"message": "hi"}}' {invoke}/chat

Without the key the gateway answers 401. List deployments with the admin API:

  curl -H 'Authorization: Bearer {stack.token}' \\
       {stack.api}/projects/demo/agents/assistant/deployments/development

Ctrl-C stops everything.""",
        flush=True,
    )


if __name__ == "__main__":
    main()
