"""Keeps a worker's policies in step with the store, and reports the worker live.

At start the worker loads a snapshot, then follows the change log from that
revision and applies each change as it arrives. A gap in the log reloads a
snapshot (applied as the difference, so unchanged routes are kept); a store
outage leaves the last policies in force while the worker retries with
backoff and catches up from the revision it applied. After every applied
change, and about every second, the worker's heartbeat records its revision.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
from collections.abc import Callable

from gateway.log import policy_log, store_log
from gateway.metrics import POLICY_CHANGES, POLICY_REVISION, STORE_UP
from gateway.policies import PolicyTable, describe_writes
from gateway.store import (
    Change,
    Store,
    StoreError,
    StoreGap,
    StoreUnavailable,
    WorkerInfo,
)

__all__ = ["Backoff", "PolicySync"]

HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_TTL_S = 5.0


class Backoff:
    """Exponential retry delays with jitter, reset after a success."""

    def __init__(self, first_s: float = 0.05, max_s: float = 2.0) -> None:
        self._first_s = first_s
        self._max_s = max_s
        self._next_s = first_s

    def reset(self) -> None:
        self._next_s = self._first_s

    def next(self) -> float:
        delay = self._next_s
        self._next_s = min(self._next_s * 2, self._max_s)
        return delay * random.uniform(0.5, 1.0)


async def _cancelled(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the tasks until each has ended.

    Once is not always enough: in Python 3.11 a cancel that meets an
    ``asyncio.timeout`` expiring in the same moment can come out as its
    TimeoutError, which the loops here take for a failed attempt and go on
    from. A worker then never finished draining.
    """
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)


class PolicySync:
    """Loads, follows and applies one environment's policies for one worker."""

    def __init__(
        self,
        store: Store,
        environment: str,
        table: PolicyTable,
        on_ready: Callable[[], None] = lambda: None,
    ) -> None:
        self._store = store
        self._environment = environment
        self._table = table
        self._on_ready = on_ready
        self._loaded = False
        self._beat = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}"

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(), name="policy-sync"),
            asyncio.create_task(self._heartbeats(), name="heartbeat"),
        ]

    async def stop(self) -> None:
        """Stop following and tell the store this worker is gone."""
        await _cancelled(self._tasks)

        with contextlib.suppress(StoreError, TimeoutError):
            async with asyncio.timeout(2.0):
                await self._store.forget_worker(self._environment, self.worker_id)

    async def _run(self) -> None:
        backoff = Backoff()
        need_snapshot = True
        while True:
            try:
                if need_snapshot:
                    await self._load_snapshot()
                    need_snapshot = False
                await self._follow(backoff)
            except StoreGap:
                policy_log.warning(
                    "change log gap after revision %d; reloading", self._table.revision
                )
                need_snapshot = True
            except StoreUnavailable as exc:
                await self._wait_for_store(exc, backoff)
            except Exception:
                policy_log.exception("policy sync failed; retrying")
                await asyncio.sleep(backoff.next())

    async def _wait_for_store(self, exc: StoreUnavailable, backoff: Backoff) -> None:
        STORE_UP.set(0)
        store_log.warning(
            "store unavailable (%s); serving revision %d", exc, self._table.revision
        )
        await asyncio.sleep(backoff.next())

    async def _load_snapshot(self) -> None:
        snapshot = await self._store.snapshot(self._environment)
        writes = self._table.diff(snapshot.policies)
        self._apply(snapshot.revision, writes)

    async def _follow(self, backoff: Backoff) -> None:
        changes = self._store.follow(self._environment, self._table.revision)
        self._mark_following()
        async for change in changes:
            backoff.reset()
            self._apply_change(change)

    def _mark_following(self) -> None:
        STORE_UP.set(1)
        log = policy_log.debug if self._loaded else policy_log.info
        log("following %s from revision %d", self._environment, self._table.revision)
        if not self._loaded:
            self._loaded = True
            self._on_ready()

    def _apply_change(self, change: Change) -> None:
        if change.revision <= self._table.revision:
            return
        if change.revision != self._table.revision + 1:
            raise StoreGap(f"expected revision {self._table.revision + 1}")
        self._apply(change.revision, change.writes)

    def _apply(self, revision: int, writes: dict[str, bytes | None]) -> None:
        self._table.apply(revision, writes)
        POLICY_REVISION.set(revision)
        POLICY_CHANGES.inc()
        self._beat.set()
        policy_log.info("applied revision %d: %s", revision, describe_writes(writes))

    async def _heartbeats(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HEARTBEAT_INTERVAL_S):
                    await self._beat.wait()
            self._beat.clear()
            if self._loaded or self._table.revision > 0:
                await self._heartbeat()

    async def _heartbeat(self) -> None:
        info = WorkerInfo(
            id=self.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            revision=self._table.revision,
            last_seen=time.time(),
        )
        try:
            async with asyncio.timeout(HEARTBEAT_TTL_S):
                await self._store.heartbeat(self._environment, info, HEARTBEAT_TTL_S)
        except (StoreError, TimeoutError) as exc:
            store_log.debug("heartbeat failed: %s", exc)
