"""The gateway's parent process: starts workers, keeps them alive, stops them.

Workers share the traffic port through SO_REUSEPORT, so the kernel spreads
connections over them and a restarted worker simply binds again; the
supervisor first makes sure that no one else holds the port. The
supervisor serves the management port, restarts a worker that dies, and on
SIGTERM (or SIGINT) asks every worker to drain and waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing.process import BaseProcess
from typing import Any

import msgspec
import uvloop
from aiohttp import web
from prometheus_client.multiprocess import mark_process_dead

from gateway.cli import GatewaySettings
from gateway.log import gateway_log
from gateway.management import Readiness, management_app
from gateway.worker import run_worker

__all__ = ["PortInUse", "Supervisor", "run_supervisor"]

_POLL_S = 0.2
_RESTART_DELAY_S = 1.0


class _Slot:
    """One worker position: its current process and its readiness flag."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: BaseProcess | None = None
        self.ready: Any = None
        self.started_at = 0.0


class Supervisor:
    """Runs the workers of one gateway and its management port."""

    def __init__(self, settings: GatewaySettings, metrics_dir: str) -> None:
        self._settings = settings
        self._metrics_dir = metrics_dir
        self._context = multiprocessing.get_context("spawn")
        self._slots = [_Slot(i) for i in range(settings.workers)]
        self._stop = asyncio.Event()

    def _readiness(self) -> tuple[int, int]:
        ready = sum(1 for slot in self._slots if slot.ready and slot.ready.is_set())
        return ready, len(self._slots)

    def _spawn(self, slot: _Slot) -> None:
        slot.ready = self._context.Event()
        slot.process = self._context.Process(
            target=run_worker,
            args=(self._settings, slot.ready),
            name=f"agw-worker-{slot.index}",
        )
        slot.process.start()
        slot.started_at = time.monotonic()
        gateway_log.info("worker %d started (pid %s)", slot.index, slot.process.pid)

    def _check(self, slot: _Slot) -> None:
        """Restart a worker that died, at most once per restart delay."""
        process = slot.process
        if process is not None and process.is_alive():
            return
        if process is not None and process.exitcode is not None:
            gateway_log.error(
                "worker %d (pid %s) exited with %s; restarting",
                slot.index,
                process.pid,
                process.exitcode,
            )
            _forget(process)
            slot.process = None
        if time.monotonic() - slot.started_at >= _RESTART_DELAY_S:
            self._spawn(slot)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)

        management = await self._start_management()
        for slot in self._slots:
            self._spawn(slot)
        self._log_start()

        while not self._stop.is_set():
            for slot in self._slots:
                self._check(slot)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), _POLL_S)

        await self._stop_workers()
        await management.cleanup()
        gateway_log.info("gateway stopped")
        return 0

    def _log_start(self) -> None:
        s = self._settings
        gateway_log.info(
            "gateway for environment %s: traffic %s:%d, management %s:%d, %d worker(s)",
            s.environment,
            s.host,
            s.port,
            s.admin_host,
            s.admin_port,
            s.workers,
        )

    async def _start_management(self) -> web.AppRunner:
        app = management_app(Readiness(self._readiness), self._metrics_dir)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self._settings.admin_host, self._settings.admin_port)
        await site.start()
        return runner

    async def _stop_workers(self) -> None:
        """SIGTERM every worker, wait for their drain, kill what outlives it."""
        gateway_log.info("stopping: draining workers")
        processes = [s.process for s in self._slots if s.process is not None]
        for process in processes:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

        await asyncio.to_thread(
            _join_all, processes, self._settings.drain_grace_s + 5.0
        )
        for process in processes:
            if process.is_alive():
                gateway_log.error("worker pid %s did not stop; killing", process.pid)
                process.kill()
            process.join(timeout=1.0)
            _forget(process)


def _join_all(processes: list[BaseProcess], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))


def _forget(process: BaseProcess) -> None:
    if process.pid is not None:
        mark_process_dead(process.pid)  # type: ignore[no-untyped-call]


class PortInUse(Exception):
    """The traffic port is already bound, by another gateway or any program."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(f"port {port} on {host} is in use")


def _reserve_port(host: str, port: int) -> socket.socket:
    """Claim the traffic port for this gateway alone and hold it.

    A first bind without SO_REUSEPORT fails while anything else holds the
    port, so a second gateway cannot silently join the first one's workers
    and split its traffic. SO_REUSEADDR lets it pass over connections left
    in TIME_WAIT by a previous run. The port is then held, bound but not
    listening (so receiving nothing), with SO_REUSEPORT for the workers.

    Known gap: another gateway starting in the instant between the two
    binds could still join; closing it would take one socket owned by the
    supervisor and passed to the workers instead of SO_REUSEPORT.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM
    )[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(host, port) from exc
            raise
        address = probe.getsockname()  # the port picked when asked for 0

    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


def run_supervisor(settings: GatewaySettings) -> int:
    """Run the gateway until SIGTERM; the exit code of ``python -m gateway``."""
    metrics_dir = tempfile.mkdtemp(prefix="agw-metrics-")
    # Workers inherit this and write their metrics there (multiprocess mode).
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        with _reserve_port(settings.host, settings.port) as reserved:
            port = reserved.getsockname()[1]
            settings = msgspec.structs.replace(settings, port=port)
            return uvloop.run(Supervisor(settings, metrics_dir).run())
    except (PortInUse, OSError) as exc:
        gateway_log.error("cannot start: %s", exc)
        return 1
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
