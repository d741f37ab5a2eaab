"""The store shared by the control plane and every gateway worker.

Two backends implement :class:`Store`: Redis (``redis://``, ``rediss://``,
``unix://`` URLs) for several hosts, and an embedded store (a directory on
disk) for one host. Nothing outside this package knows which one it runs on.

The store holds two kinds of data:

- *records*: the control plane's own documents (environments, projects,
  agents, deployments, identity providers, API-key metadata), under
  slash-separated keys, listed by prefix;
- *policies*: per environment, the flat map described in
  :mod:`gateway.policy`, which gateways enforce.

:meth:`Store.commit` is the only way to change policies. It writes records
and policies at once, bumps the environment's revision by one and appends a
:class:`Change` to the environment's change log, all atomically: two commits
at the same time never lose one. Gateways follow that log.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import msgspec

__all__ = [
    "Change",
    "Snapshot",
    "Store",
    "StoreConflict",
    "StoreError",
    "StoreGap",
    "StoreUnavailable",
    "WorkerInfo",
    "open_store",
]


class StoreError(Exception):
    """Root of the store's errors."""


class StoreUnavailable(StoreError):
    """The store cannot be reached; the caller may retry later."""


class StoreConflict(StoreError):
    """A commit's expectations did not hold; nothing was written."""

    def __init__(self, key: str) -> None:
        super().__init__(f"record {key!r} changed concurrently")
        self.key = key


class StoreGap(StoreError):
    """The change log no longer reaches back to the asked revision."""


class Change(msgspec.Struct, frozen=True):
    """One committed change of an environment's policies."""

    revision: int
    writes: dict[str, bytes | None]


class Snapshot(msgspec.Struct, frozen=True):
    """Every policy of an environment as of one revision."""

    revision: int
    policies: dict[str, bytes]


class WorkerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A live gateway worker as it last reported itself."""

    id: str
    host: str
    pid: int
    revision: int
    last_seen: float


class Store(Protocol):
    """What both backends provide. Every method may raise StoreUnavailable."""

    async def get(self, key: str) -> bytes | None: ...

    async def scan(self, prefix: str) -> dict[str, bytes]:
        """Every record whose key starts with ``prefix``, sorted by key."""
        ...

    async def put(self, key: str, value: bytes) -> None:
        """Write a record that gateways do not enforce (no revision bump)."""
        ...

    async def delete(self, key: str) -> bool: ...

    async def commit(
        self,
        environment: str,
        *,
        records: Mapping[str, bytes | None] | None = None,
        policies: Mapping[str, bytes | None] | None = None,
        expect: Mapping[str, bytes | None] | None = None,
    ) -> int:
        """Atomically write records and policies, bump and return the revision.

        ``None`` as a value deletes. ``expect`` maps record keys to the value
        they must hold (``None``: absent) or the commit raises StoreConflict
        and writes nothing. Every commit, even one with no policy writes,
        increases the revision and appends a Change.
        """
        ...

    async def revision(self, environment: str) -> int: ...

    async def snapshot(self, environment: str) -> Snapshot: ...

    def follow(self, environment: str, after: int) -> AsyncIterator[Change]:
        """Yield every Change after revision ``after``, in order, forever.

        Revisions are consecutive. Raises StoreGap when the log no longer holds
        ``after + 1`` and StoreUnavailable when the store goes away; the caller
        then reloads a snapshot or retries.
        """
        ...

    async def heartbeat(
        self, environment: str, worker: WorkerInfo, ttl_s: float
    ) -> None:
        """Record a worker as live until ``ttl_s`` seconds from now."""
        ...

    async def forget_worker(self, environment: str, worker_id: str) -> None: ...

    async def workers(self, environment: str) -> list[WorkerInfo]:
        """The live workers of an environment, sorted by id."""
        ...

    async def close(self) -> None: ...


def open_store(location: str) -> Store:
    """Open the store named by a Redis URL or an embedded-store directory."""
    if location.startswith(("redis://", "rediss://", "unix://")):
        from gateway.store.redis import RedisStore

        return RedisStore(location)

    from gateway.store.embedded import EmbeddedStore

    return EmbeddedStore(location)
