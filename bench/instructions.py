"""Instructions the gateway's worker spends per proxied request, from callgrind.

Time figures (``bench.harness``) move with whatever else the machine runs;
instruction counts hardly do. One command (``python -m bench.instructions``)
starts the harness's nginx upstream, control plane (for setup) and gateway
with one worker on the embedded store, that worker alone under ``valgrind
--tool=callgrind``. Each row sends a warm-up, then N1, then N2 requests, one
at a time over one keep-alive connection; the worker's counters are zeroed
before each batch and dumped after it. A row's figure is (I2 - I1) / (N2 - N1)
of the event-loop thread, less the idle work of the batches' difference in
time: start-up, connection set-up and what the worker does anyway cancel out.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import http.client
import itertools
import platform
import shlex
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from bench.harness import (
    Ports,
    Row,
    Stack,
    build_rows,
    check_rows,
    find_tool,
    parser_build,
    prepare_ours,
    start_upstream,
    workdir,
)
from bench.keys import SigningKey

__all__ = [
    "Batch",
    "callgrind_summary",
    "format_table",
    "main",
    "per_request",
    "pick_rows",
    "request_counts",
    "worker_shim",
]

LIBRARIES = ("aiohttp", "httptools", "uvloop", "cryptography", "msgspec")
VALGRIND = ("valgrind", "--tool=callgrind", "--separate-threads=yes")

# multiprocessing starts a gateway worker as ``<executable> -B -c '...' \
# --multiprocessing-fork``. This script stands in for that executable so that
# the worker, and neither the supervisor nor multiprocessing's resource
# tracker, runs under callgrind. A fixed hash seed keeps the worker's dict
# layouts, and so its instruction counts, the same from run to run.
_SHIM = """#!/bin/sh
case "$*" in
*--multiprocessing-fork*)
    echo $$ > {pid_file}
    PYTHONHASHSEED=0 exec {valgrind} --callgrind-out-file={out} {python} "$@" ;;
esac
exec {python} "$@"
"""

# ``python -m gateway``, its multiprocessing executable replaced by argv[1].
_LAUNCHER = (
    "import multiprocessing, sys; from gateway.cli import main; "
    "multiprocessing.set_executable(sys.argv.pop(1)); sys.exit(main(sys.argv[1:]))"
)


@dataclass(frozen=True)
class Batch:
    """Requests sent between a zero and a dump, and what they cost."""

    requests: int
    instructions: int
    seconds: float


def callgrind_summary(lines: Iterable[str]) -> int:
    """The ``summary:`` of a callgrind dump: instructions since the last zero."""
    for line in lines:
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise ValueError("no summary line in the callgrind dump")


def per_request(first: Batch, second: Batch, idle_per_s: float) -> float:
    """Instructions per request that ``second`` sent more than ``first``.

    What the worker does whether or not requests come (timers, heartbeats)
    grows with time, not requests: it is taken out at the idle rate.
    """
    idle = idle_per_s * (second.seconds - first.seconds)
    extra = second.instructions - first.instructions - idle
    return extra / (second.requests - first.requests)


def worker_shim(pid_file: Path, out: Path, python: str) -> str:
    """The stand-in executable that runs gateway workers under callgrind."""
    return _SHIM.format(
        pid_file=shlex.quote(str(pid_file)),
        valgrind=shlex.join(VALGRIND),
        out=shlex.quote(str(out)),
        python=shlex.quote(python),
    )


class Worker:
    """The gateway worker under callgrind: zero its counters, dump, read them."""

    def __init__(self, pid: int, out_dir: Path) -> None:
        self.pid = pid
        self.out_dir = out_dir
        self.dumps = 0

    def _control(self, option: str) -> None:
        argv = ["callgrind_control", option, str(self.pid)]
        subprocess.run(argv, check=True, capture_output=True)

    def measure(self, load: Callable[[], int]) -> Batch:
        """Zero, run ``load`` (which answers how many requests it sent), dump."""
        self._control("--zero")
        start = time.monotonic()
        requests = load()
        seconds = time.monotonic() - start
        self._control("--dump")

        # Dumps are numbered from 1, one file a thread; thread 1 runs the loop.
        self.dumps += 1
        path = self.out_dir / f"callgrind.out.{self.pid}.{self.dumps}-01"
        with path.open() as dump:
            return Batch(requests, callgrind_summary(dump), seconds)


def send(row: Row, slot: int, count: int) -> int:
    """``count`` requests, one at a time on one connection; each must be a 200."""
    url = urllib.parse.urlsplit(row.url)
    values = row.header_values(slot) or [""]
    if row.per_round and len(values) < count:
        raise RuntimeError(f"{row.label}: {len(values)} tokens for {count} requests")

    connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=60)
    try:
        for value in itertools.islice(itertools.cycle(values), count):
            connection.putrequest("GET", url.path, skip_accept_encoding=True)
            if value:
                connection.putheader(row.header, value)
            connection.endheaders()
            with connection.getresponse() as response:
                response.read()
            if response.status != 200:
                raise RuntimeError(f"{row.label}: answered {response.status}")
    finally:
        connection.close()
    return count


def idle(seconds: float) -> int:
    """Send nothing for ``seconds``."""
    time.sleep(seconds)
    return 0


def pick_rows(rows: Sequence[Row]) -> list[Row]:
    """The harness's rows of ours, c+ labelled with the size of what it carries.

    c+ is ``none`` carrying d's token, unchecked: it tells the cost of
    carrying an Authorization header from the cost of checking it.
    """
    picked = []
    for row in rows:
        if not row.ours:
            continue
        label = row.label.removeprefix("ours, ")
        if row.key == "c+":
            size = len(f"{row.header}: {row.header_values(0)[0]}")
            label = f"auth none, {size}-byte Authorization unchecked"
        picked.append(dataclasses.replace(row, label=label))
    return picked


def format_table(figures: Sequence[tuple[Row, float]]) -> str:
    """Instructions per request, and each row against the first (auth none)."""
    base = figures[0][1]
    lines = [f"{'row':<49}{'instr/req':>11}{'x none':>8}{'- none':>10}"]
    for row, figure in figures:
        lines.append(
            f"{row.key:<3}{row.label:<46}{figure:>11,.0f}"
            f"{figure / base:>8.2f}{figure - base:>+10,.0f}"
        )
    return "\n".join(lines)


def start_gateway(args: argparse.Namespace, stack: Stack, ports: Ports) -> list[Row]:
    """The stack with its gateway worker under callgrind; answer the rows."""
    pid_file = stack.root / "worker.pid"
    shim = stack.root / "worker-python"
    out = stack.root / "callgrind.out.%p"
    shim.write_text(worker_shim(pid_file, out, sys.executable))
    shim.chmod(0o755)

    start_upstream(stack, ports)
    loaded = prepare_ours(
        stack,
        ports,
        SigningKey.generate(),
        tokens=16,
        distinct_tokens=3 * args.requests[1],
        api_keys=4,
        gateway=[sys.executable, "-c", _LAUNCHER, str(shim)],
        ready_s=300,
    )
    rows = pick_rows(build_rows(stack, ports, loaded, args.requests[1]))
    check_rows(stack, rows)
    return rows


def measure(args: argparse.Namespace, worker: Worker, rows: Sequence[Row]) -> None:
    """The idle rate, then each row's two batches; print the table."""
    quiet = worker.measure(functools.partial(idle, args.idle))
    idle_per_s = quiet.instructions / quiet.seconds
    print(f"  idle: {idle_per_s:,.0f} instructions/s", flush=True)

    figures = []
    n1, n2 = args.requests
    for row in rows:
        send(row, 0, args.warmup)
        first = worker.measure(functools.partial(send, row, 1, n1))
        second = worker.measure(functools.partial(send, row, 2, n2))
        figure = per_request(first, second, idle_per_s)
        figures.append((row, figure))
        print(
            f"  row {row.key}: {figure:,.0f} instructions/request "
            f"({first.seconds:.0f} s + {second.seconds:.0f} s)",
            flush=True,
        )
    print(format_table(figures))
    print(
        "callgrind, the worker's event-loop thread: "
        "(I2 - I1 - idle/s x (t2 - t1)) / (N2 - N1)\n"
        f"N1={n1}, N2={n2}, idle {idle_per_s:,.0f}/s, {args.warmup} warm-up; "
        "one request at a time on one connection",
        flush=True,
    )


def describe() -> str:
    """What the counts depend on besides our code: interpreter, libraries, valgrind."""
    done = subprocess.run(["valgrind", "--version"], capture_output=True, text=True)
    libraries = (f"{name} {metadata.version(name)}" for name in LIBRARIES)
    return ", ".join(
        [
            f"Python {platform.python_version()}",
            *libraries,
            parser_build(),
            done.stdout.strip(),
        ]
    )


def request_counts(text: str) -> tuple[int, int]:
    """``N1,N2`` of the command line."""
    n1, n2 = (int(part) for part in text.split(","))
    if not 0 < n1 < n2:
        raise argparse.ArgumentTypeError("give N1,N2 with 0 < N1 < N2")
    return n1, n2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--requests", type=request_counts, default=(500, 2500), help="N1,N2 a row"
    )
    parser.add_argument("--warmup", type=int, default=200, help="requests a row")
    parser.add_argument("--idle", type=float, default=10, help="seconds idle")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for tool in ("valgrind", "callgrind_control", "nginx"):
        if not find_tool(tool):
            sys.exit(f"instructions: needs {tool} (Debian: valgrind, nginx)")
    with workdir(args.keep) as root:
        stack = Stack(root)
        try:
            rows = start_gateway(args, stack, Ports())
            worker = Worker(int((root / "worker.pid").read_text()), root)
            print(describe(), flush=True)
            measure(args, worker, rows)
        finally:
            stack.stop_all()


if __name__ == "__main__":
    main()
