"""Side-by-side throughput of the gateway, HAProxy's JWT check and bare nginx.

One command (``python -m bench.harness``) installs what is missing (Debian's
nginx, haproxy 2.6 and wrk), starts an nginx upstream, HAProxy as a
JWT-checking gateway, our control plane (for setup only) and our gateway with
one worker on the embedded store, all on 127.0.0.1 under a temporary
directory. The system under test is pinned to CPU 1; wrk and the upstream to
CPU 0. Rows are measured interleaved, several rounds, each row once a round
with the same wrk settings; the median round is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.keys import AUDIENCE, ISSUER, SigningKey, mint_pool
from bench.setup_stack import AGENTS, Api, Plan, setup

__all__ = [
    "Row",
    "Stack",
    "cpu_ticks",
    "haproxy_config",
    "main",
    "nginx_config",
    "parse_wrk",
    "parser_build",
]

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
SUT_CPU = "1"
LOAD_CPU = "0"
TOOLS = {"nginx": "nginx", "haproxy": "haproxy", "wrk": "wrk"}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
GATEWAY = (sys.executable, "-m", "gateway")

# One Lua script drives every row. Arguments: header name, credentials file,
# first line, line count, value prefix. Requests are formatted once in init so
# that wrk's own CPU (on the other core) stays small; done() prints exact
# figures as one JSON line instead of wrk's rounded text.
WRK_SCRIPT = r"""
local requests = {}
local index = 0

function init(args)
  local header, file = args[1], args[2]
  if header == nil or header == "" then return end
  local first, count = tonumber(args[3]), tonumber(args[4])
  local prefix = args[5] or ""
  local line = 0
  for value in io.lines(file) do
    line = line + 1
    if line > first + count then break end
    if line > first and value ~= "" then
      local headers = {}
      headers[header] = prefix .. value
      requests[#requests + 1] = wrk.format(nil, nil, headers)
    end
  end
end

function request()
  if #requests == 0 then return wrk.request() end
  index = index % #requests + 1
  return requests[index]
end

function done(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "status_errors": %d, ' ..
    '"socket_errors": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, e.status,
    e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def nginx_config(root: Path, port: int) -> str:
    """The upstream: one worker answering a short 200 to everything."""
    tmp = root / "nginx-tmp"
    return f"""
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen {HOST}:{port};
        keepalive_requests 1000000;
        location / {{ return 200 "ok"; }}
    }}
}}
"""


def haproxy_config(port: int, upstream_port: int, public_key: Path) -> str:
    """HAProxy as a JWT gateway doing the checks ours does for the same token.

    Bearer present, ``alg`` is RS256, ``iss`` and ``aud`` match, ``exp`` is in
    the future (against ``date()``) and the signature verifies with the
    benchmark's public key. HAProxy keeps no cache of verified tokens: every
    request pays one RSA verification.
    """
    verify = f'jwt_verify(txn.alg,"{public_key}")'
    deny = "http-request deny deny_status 401"
    return f"""
global
    nbthread 1
    maxconn 8192

defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend jwt_gateway
    bind {HOST}:{port}
    http-request set-var(txn.bearer) http_auth_bearer
    {deny} unless {{ var(txn.bearer) -m found }}
    http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('$.alg')
    {deny} unless {{ var(txn.alg) -m str RS256 }}
    http-request set-var(txn.iss) var(txn.bearer),jwt_payload_query('$.iss')
    {deny} unless {{ var(txn.iss) -m str {ISSUER} }}
    http-request set-var(txn.aud) var(txn.bearer),jwt_payload_query('$.aud')
    {deny} unless {{ var(txn.aud) -m str {AUDIENCE} }}
    http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('$.exp','int')
    http-request set-var(txn.now) date()
    {deny} unless {{ var(txn.exp),sub(txn.now) -m int gt 0 }}
    {deny} unless {{ var(txn.bearer),{verify} -m int 1 }}
    default_backend upstream

backend upstream
    http-reuse always
    server nginx {HOST}:{upstream_port}
"""


def ensure_tools() -> None:
    """Install Debian's nginx, haproxy and wrk, only those that are missing."""
    missing = [pkg for tool, pkg in TOOLS.items() if not find_tool(tool)]
    if not missing:
        return
    print(f"harness: installing {' '.join(missing)} with apt-get", flush=True)
    install = ["apt-get", "install", "-y", "-q", *missing]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(install, env=env, check=True)


def find_tool(name: str) -> str | None:
    """``name`` on PATH or in /usr/sbin, where Debian puts nginx and haproxy."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; fields follow the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """``root`` and every live descendant."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_ticks(roots: Sequence[int]) -> int:
    """User plus system clock ticks of the processes under ``roots``."""
    total = 0
    for root in roots:
        for pid in process_tree(root):
            fields = _stat_fields(pid)
            if fields:
                total += int(fields[11]) + int(fields[12])
    return total


def parse_wrk(output: str) -> dict[str, float]:
    """The figures the Lua ``done`` hook printed."""
    for line in output.splitlines():
        if line.startswith("WRK_JSON "):
            return dict(json.loads(line.removeprefix("WRK_JSON ")))
    raise RuntimeError(f"wrk printed no result:\n{output}")


class Stack:
    """Every process the harness started, each in its own process group."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, cpu: str, argv: Sequence[str]) -> int:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115
        process = subprocess.Popen(
            ["taskset", "-c", cpu, *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
        self.processes[name] = process
        return process.pid

    def pid(self, name: str) -> int:
        return self.processes[name].pid

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                log = (self.root / f"{name}.log").read_text()[-3000:]
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{log}")

    def stop(self, name: str) -> None:
        process = self.processes.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.stop(name)


def http_status(url: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return 0


def wait_for(
    stack: Stack,
    url: str,
    headers: dict[str, str] | None = None,
    timeout_s: float = 60,
) -> None:
    """Poll ``url`` until it answers 200, failing fast if a process died."""
    deadline = time.monotonic() + timeout_s
    while http_status(url, headers) != 200:
        stack.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer 200 within {timeout_s:.0f} s")
        time.sleep(0.2)


@dataclass
class Row:
    """One line of the table: a URL, its credentials and what it measures."""

    key: str
    label: str
    url: str
    sut: Callable[[], list[int]]
    header: str = ""
    credentials: Path | None = None
    prefix: str = ""
    per_round: int = 0
    ours: bool = False
    results: list[dict[str, float]] = field(default_factory=list)

    def wrk_args(self, slot: int) -> list[str]:
        """Script arguments; ``per_round`` > 0 gives each round its own slice."""
        if not self.header or self.credentials is None:
            return []
        first = slot * self.per_round
        count = self.per_round or 1_000_000_000
        return [self.header, str(self.credentials), str(first), str(count), self.prefix]

    def header_values(self, slot: int) -> list[str]:
        """What ``wrk_args(slot)`` makes the Lua script send, for other clients."""
        if not self.header or self.credentials is None:
            return []
        lines = self.credentials.read_text().splitlines()
        if self.per_round:
            lines = lines[slot * self.per_round : (slot + 1) * self.per_round]
        return [self.prefix + line for line in lines if line]

    def headers(self) -> dict[str, str]:
        if not self.header or self.credentials is None:
            return {}
        value = self.credentials.read_text().split("\n", 1)[0]
        return {self.header: self.prefix + value}


@dataclass
class Settings:
    """wrk settings shared by every row, and the shape of the run."""

    threads: int
    connections: int
    duration_s: int
    warmup_s: int
    rounds: int


def run_wrk(
    row: Row, settings: Settings, duration_s: int, slot: int
) -> dict[str, float]:
    """Load one row once; answer wrk's figures plus the SUT's CPU time."""
    script = Path(tempfile.gettempdir()) / "agw-bench-wrk.lua"
    script.write_text(WRK_SCRIPT)
    argv = [
        "taskset", "-c", LOAD_CPU, find_tool("wrk") or "wrk",
        f"-t{settings.threads}", f"-c{settings.connections}", f"-d{duration_s}s",
        "--timeout", "10s", "-s", str(script), row.url, "--", *row.wrk_args(slot),
    ]  # fmt: skip
    roots = row.sut()
    before = cpu_ticks(roots)
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    ticks = cpu_ticks(roots) - before

    figures = parse_wrk(done.stdout)
    requests = max(figures["requests"], 1)
    figures["rps"] = requests / (figures["duration_us"] / 1e6)
    figures["cpu_us"] = ticks / CLOCK_TICKS * 1e6 / requests
    return figures


def median(row: Row, name: str) -> float:
    return float(statistics.median(result[name] for result in row.results))


def format_table(rows: Sequence[Row], settings: Settings) -> str:
    haproxy = next((row for row in rows if row.key == "b" and row.results), None)
    lines = [
        f"{'row':<40}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'CPU us/req':>12}{'errors':>8}   vs HAProxy JWT (req/s, CPU/req)"
    ]
    for row in rows:
        if not row.results:
            continue
        rps, cpu = median(row, "rps"), median(row, "cpu_us")
        errors = sum(r["status_errors"] + r["socket_errors"] for r in row.results)
        line = (
            f"{row.key:<2} {row.label:<37}{rps:>9.0f}"
            f"{median(row, 'p50_us') / 1e3:>9.2f}{median(row, 'p99_us') / 1e3:>9.2f}"
            f"{cpu:>12.1f}{errors:>8.0f}"
        )
        if row.ours and haproxy:
            line += (
                f"   {rps / median(haproxy, 'rps'):.2f}x, "
                f"{cpu / median(haproxy, 'cpu_us'):.2f}x"
            )
        lines.append(line)
    lines.extend(oauth_cost(rows))
    lines.append(
        f"median of {settings.rounds} interleaved rounds; wrk -t{settings.threads} "
        f"-c{settings.connections} -d{settings.duration_s}s on CPU {LOAD_CPU}, "
        f"system under test on CPU {SUT_CPU}; errors: non-2xx or socket, all rounds"
    )
    return "\n".join(lines)


def oauth_cost(rows: Sequence[Row]) -> list[str]:
    """What checking repeating tokens (d) costs over auth none, in CPU per request.

    Against c, the request without the header; against c+, the same bytes on
    the wire, so that what remains is the check itself.
    """
    cpu = {row.key: median(row, "cpu_us") for row in rows if row.results}
    if "d" not in cpu:
        return []
    return [
        f"OAuth (d) over {base}: {(cpu['d'] / cpu[base] - 1) * 100:+.1f}% CPU/req"
        f" ({what})"
        for base, what in (
            ("c", "a request without the header"),
            ("c+", "the same request, its header not checked"),
        )
        if base in cpu
    ]


def parser_build(extension: Path | None = None) -> str:
    """How the installed llhttp scans header values: SSE 4.2, or a byte at a time.

    Wheels from PyPI leave SSE 4.2 out; a build from source with
    ``CFLAGS=-msse4.2`` (README, "Building the header parser for your CPU")
    has it, which shows as PCMPESTRI instructions in the extension.
    """
    if extension is None:
        import httptools.parser.parser as parser

        extension = Path(parser.__file__)
    simd = b"\x66\x0f\x3a\x61" in extension.read_bytes()  # PCMPESTRI's opcode
    return "llhttp with SSE 4.2" if simd else "llhttp without SSE 4.2"


def describe_machine() -> str:
    versions = []
    for tool, flag in (("nginx", "-v"), ("haproxy", "-v"), ("wrk", "-v")):
        done = subprocess.run(
            [find_tool(tool) or tool, flag], capture_output=True, text=True, check=False
        )
        versions.append((done.stdout + done.stderr).strip().splitlines()[0])
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return (
        f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{parser_build()}\n" + "\n".join(versions)
    )


@dataclass
class Ports:
    """Every port the harness listens on, each chosen free by the OS."""

    upstream: int = field(default_factory=free_port)
    haproxy: int = field(default_factory=free_port)
    controlplane: int = field(default_factory=free_port)
    gateway: int = field(default_factory=free_port)
    management: int = field(default_factory=free_port)


def start_upstream(stack: Stack, ports: Ports) -> None:
    (stack.root / "nginx-tmp").mkdir()
    config = stack.root / "nginx.conf"
    config.write_text(nginx_config(stack.root, ports.upstream))
    nginx = find_tool("nginx") or "nginx"
    argv = [nginx, "-p", str(stack.root), "-c", str(config)]
    stack.start("nginx", LOAD_CPU, [*argv, "-e", str(stack.root / "nginx-error.log")])
    wait_for(stack, f"http://{HOST}:{ports.upstream}/")


def start_haproxy(stack: Stack, ports: Ports, public_key: Path) -> None:
    config = stack.root / "haproxy.cfg"
    config.write_text(haproxy_config(ports.haproxy, ports.upstream, public_key))
    haproxy = find_tool("haproxy") or "haproxy"
    stack.start("haproxy", SUT_CPU, [haproxy, "-db", "-f", str(config)])


def start_ours(
    stack: Stack,
    ports: Ports,
    environment: str,
    gateway: Sequence[str] = GATEWAY,
    ready_s: float = 60,
) -> str:
    """Control plane (for setup) and one gateway worker on the embedded store.

    ``gateway`` is the command that runs ``python -m gateway``'s main with the
    flags that follow it; ``ready_s`` how long its worker may take to start.
    """
    store = str(stack.root / "store")
    token_file = stack.root / "admin-token"
    token_file.touch(mode=0o600)
    token_file.write_text(secrets.token_urlsafe(32))
    stack.start("controlplane", LOAD_CPU, [
        sys.executable, "-m", "controlplane", "--store", store,
        "--admin-token-file", str(token_file), "--host", HOST,
        "--port", str(ports.controlplane),
    ])  # fmt: skip
    stack.start("gateway", SUT_CPU, [
        *gateway, "--store", store,
        "--environment", environment, "--host", HOST,
        "--port", str(ports.gateway), "--admin-port", str(ports.management),
        "--workers", "1",
    ])  # fmt: skip
    token = token_file.read_text()
    api = f"http://{HOST}:{ports.controlplane}/api/v1/environments"
    wait_for(stack, api, {"Authorization": f"Bearer {token}"})
    wait_for(stack, f"http://{HOST}:{ports.management}/readyz", timeout_s=ready_s)
    return token


def build_rows(
    stack: Stack, ports: Ports, loaded: dict[str, Any], per_round: int
) -> list[Row]:
    root = stack.root
    tokens = root / "repeating.tokens"
    tokens.write_text("\n".join(loaded["tokens"]) + "\n")
    keys = root / "api.keys"
    keys.write_text("\n".join(loaded["api_keys"]) + "\n")
    distinct = Path(loaded["distinct_tokens_file"])
    ours = f"http://{HOST}:{ports.gateway}"
    agents = loaded["agents"]

    def gateway() -> list[int]:
        return [stack.pid("gateway")]

    auth, bearer = "Authorization", "Bearer "
    return [
        Row("a", "upstream nginx alone", f"http://{HOST}:{ports.upstream}/chat",
            lambda: [stack.pid("nginx")]),
        Row("b", "HAProxy 2.6 jwt_verify RS256", f"http://{HOST}:{ports.haproxy}/chat",
            lambda: [stack.pid("haproxy")], auth, tokens, bearer),
        Row("c", "ours, auth none", f"{ours}{agents['open']['path']}/chat",
            gateway, ours=True),
        Row("c+", "ours, none + d's header, unchecked",
            f"{ours}{agents['open']['path']}/chat", gateway, auth, tokens, bearer,
            ours=True),
        Row("d", f"ours, OAuth, {len(loaded['tokens'])} repeating tokens",
            f"{ours}{agents['secured']['path']}/chat", gateway, auth, tokens, bearer,
            ours=True),
        Row("e", "ours, OAuth, every token new",
            f"{ours}{agents['secured']['path']}/chat", gateway, auth, distinct, bearer,
            per_round, ours=True),
        Row("f", "ours, API key", f"{ours}{agents['keyed']['path']}/chat", gateway,
            loaded["api_key_header"], keys, ours=True),
    ]  # fmt: skip


def check_rows(stack: Stack, rows: Sequence[Row]) -> None:
    """Every row answers 200 before anything is measured."""
    for row in rows:
        deadline = time.monotonic() + 10
        while (status := http_status(row.url, row.headers())) != 200:
            stack.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"row {row.key} ({row.url}) answered {status}")
            time.sleep(0.2)


def measure(rows: Sequence[Row], settings: Settings) -> None:
    """A warm-up pass, then ``rounds`` passes over every row in turn."""
    for row in rows:
        run_wrk(row, settings, settings.warmup_s, slot=0)
    for index in range(settings.rounds):
        for row in rows:
            result = run_wrk(row, settings, settings.duration_s, slot=index + 1)
            row.results.append(result)
            print(
                f"  round {index + 1} row {row.key}: {result['rps']:.0f} req/s, "
                f"{result['cpu_us']:.1f} us CPU/req",
                flush=True,
            )
    for row in rows:
        if row.per_round and any(r["requests"] > row.per_round for r in row.results):
            print(f"  note: row {row.key} ran out of distinct tokens and repeated")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=5, help="seconds a row")
    parser.add_argument("--warmup", type=int, default=2, help="seconds a row")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16, help="repeating pool")
    parser.add_argument(
        "--distinct-per-round",
        type=int,
        default=60_000,
        help="distinct tokens a round of row e may use (more than it can send)",
    )
    parser.add_argument("--rows", default="abcdef", help="subset, e.g. 'abd'")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    return parser.parse_args(argv)


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="agw-bench-"))
    try:
        yield root
    finally:
        if keep:
            print(f"harness: logs and configs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def prepare_ours(
    stack: Stack,
    ports: Ports,
    key: SigningKey,
    *,
    tokens: int,
    distinct_tokens: int,
    api_keys: int,
    gateway: Sequence[str] = GATEWAY,
    ready_s: float = 60,
) -> dict[str, Any]:
    """Start our stack, set it up through the control plane, then stop that."""
    environment = "bench"
    admin_token = start_ours(stack, ports, environment, gateway, ready_s)
    upstream = f"http://{HOST}:{ports.upstream}"
    plan = Plan(
        environment=environment,
        gateway_url=f"http://{HOST}:{ports.gateway}",
        upstream_url=upstream,
        sse_upstream_url=upstream,
        out=stack.root / "stack.json",
        tokens=tokens,
        distinct_tokens=distinct_tokens,
        api_keys=api_keys,
    )
    print(f"harness: setting up; minting {plan.distinct_tokens} tokens", flush=True)
    api = Api(f"http://{HOST}:{ports.controlplane}", admin_token)
    loaded = setup(api, plan, key)
    stack.stop("controlplane")
    return loaded


def baseline_only(args: argparse.Namespace, key: SigningKey) -> dict[str, Any]:
    """Inputs for rows a and b alone: tokens, and no agent of ours."""
    return {
        "tokens": list(mint_pool(key, "repeat", args.tokens)),
        "api_keys": [],
        "api_key_header": "X-API-Key",
        "distinct_tokens_file": "",
        "agents": {name: {"path": ""} for name in AGENTS},
    }


def run(args: argparse.Namespace, stack: Stack) -> None:
    settings = Settings(
        args.threads, args.connections, args.duration, args.warmup, args.rounds
    )
    ports, key = Ports(), SigningKey.generate()
    public_key = stack.root / "bench-public.pem"
    public_key.write_bytes(key.public_pem())

    start_upstream(stack, ports)
    if set(args.rows) & set("cdef"):
        loaded = prepare_ours(
            stack,
            ports,
            key,
            tokens=args.tokens,
            distinct_tokens=(args.rounds + 1) * args.distinct_per_round,
            api_keys=4 if "f" in args.rows else 0,
        )
    else:
        loaded = baseline_only(args, key)
    start_haproxy(stack, ports, public_key)

    rows = [
        row
        for row in build_rows(stack, ports, loaded, args.distinct_per_round)
        if row.key[0] in args.rows  # c+ comes with c
    ]
    check_rows(stack, rows)
    print(describe_machine(), flush=True)
    measure(rows, settings)
    print(format_table(rows, settings), flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if (os.cpu_count() or 1) < 2:
        sys.exit("harness: needs two CPUs (one for the system under test)")
    ensure_tools()
    with workdir(args.keep) as root:
        stack = Stack(root)
        try:
            run(args, stack)
        finally:
            stack.stop_all()


if __name__ == "__main__":
    main()
