"""The embedded store: one SQLite database on disk, shared by processes of one host.

The database is ``<directory>/store.sqlite3`` in WAL mode, so readers never
wait for the writer and a crash mid-write leaves the last committed state.
``synchronous=FULL`` makes every commit durable once it returns: commits are
deployments and heartbeats, rare enough that an fsync each is cheap.

Every SQLite call runs on one worker thread per store, holding that thread's
only connection, so the event loop never blocks on disk or on another
process's lock. Commits from other processes are noticed by a watcher thread
that polls ``PRAGMA data_version`` (a read of shared memory, no disk I/O):
every 5 ms after a change, slowing to every 25 ms while nothing changes, as
each poll is a thread wake-up (~0.1 ms of CPU on a small VM).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TypeVar

import msgspec

from gateway.log import store_log
from gateway.store import (
    Change,
    Snapshot,
    StoreConflict,
    StoreGap,
    StoreUnavailable,
    WorkerInfo,
)

__all__ = ["EmbeddedStore"]

T = TypeVar("T")

DATABASE_NAME = "store.sqlite3"
BUSY_TIMEOUT_MS = 10_000
FOLLOW_BATCH = 512

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS records (
        key TEXT PRIMARY KEY, value BLOB NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS policies (
        environment TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
        PRIMARY KEY (environment, key)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS revisions (
        environment TEXT PRIMARY KEY, revision INTEGER NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS changes (
        environment TEXT NOT NULL, revision INTEGER NOT NULL, writes BLOB NOT NULL,
        PRIMARY KEY (environment, revision)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS workers (
        environment TEXT NOT NULL, id TEXT NOT NULL, document BLOB NOT NULL,
        expires_at REAL NOT NULL,
        PRIMARY KEY (environment, id)
    ) WITHOUT ROWID""",
)

# The change log stores each Change's writes as msgpack: it keeps bytes and
# None apart without base64.
_encode_writes = msgspec.msgpack.Encoder().encode
_decode_writes = msgspec.msgpack.Decoder(dict[str, bytes | None]).decode
_decode_worker = msgspec.json.Decoder(WorkerInfo).decode


class EmbeddedStore:
    """The store on SQLite, for one host; several processes may open it at once."""

    def __init__(
        self,
        directory: str | Path,
        *,
        change_log_size: int = 10_000,
        poll_interval_s: float = 0.005,
        quiet_poll_interval_s: float = 0.025,
    ) -> None:
        if change_log_size < 1:
            raise ValueError("change_log_size must be at least 1")

        self.path = Path(directory) / DATABASE_NAME
        self._log_size = change_log_size
        self._poll_interval_s = poll_interval_s
        self._quiet_poll_interval_s = max(quiet_poll_interval_s, poll_interval_s)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="agw-store")
        self._conn: sqlite3.Connection | None = None
        self._watcher: _Watcher | None = None
        self._changed = asyncio.Event()
        self._closed = False

    async def get(self, key: str) -> bytes | None:
        return await self._run(lambda conn: _get(conn, key))

    async def scan(self, prefix: str) -> dict[str, bytes]:
        return await self._run(lambda conn: _scan(conn, prefix))

    async def put(self, key: str, value: bytes) -> None:
        await self._run(lambda conn: _put(conn, key, value))

    async def delete(self, key: str) -> bool:
        return await self._run(lambda conn: _delete(conn, key))

    async def commit(
        self,
        environment: str,
        *,
        records: Mapping[str, bytes | None] | None = None,
        policies: Mapping[str, bytes | None] | None = None,
        expect: Mapping[str, bytes | None] | None = None,
    ) -> int:
        commit = _Commit(
            environment,
            dict(records or {}),
            dict(policies or {}),
            dict(expect or {}),
            self._log_size,
        )
        revision = await self._run(commit.run)

        # Followers in this process need not wait for the watcher's next poll.
        self._wake()
        return revision

    async def revision(self, environment: str) -> int:
        return await self._run(lambda conn: _revision(conn, environment))

    async def snapshot(self, environment: str) -> Snapshot:
        return await self._run(lambda conn: _snapshot(conn, environment))

    async def follow(self, environment: str, after: int) -> AsyncIterator[Change]:
        self._start_watcher()
        while True:
            # Taken before reading, so a commit landing after the read wakes us.
            changed = self._changed
            batch = await self._run(
                partial(_changes_after, environment=environment, after=after)
            )
            for change in batch:
                yield change
                after = change.revision

            if not batch:
                await changed.wait()

    async def heartbeat(
        self, environment: str, worker: WorkerInfo, ttl_s: float
    ) -> None:
        document = msgspec.json.encode(worker)
        await self._run(
            lambda conn: _heartbeat(conn, environment, worker.id, document, ttl_s)
        )

    async def forget_worker(self, environment: str, worker_id: str) -> None:
        await self._run(lambda conn: _forget_worker(conn, environment, worker_id))

    async def workers(self, environment: str) -> list[WorkerInfo]:
        return await self._run(lambda conn: _workers(conn, environment))

    async def close(self) -> None:
        if self._closed:
            return

        self._closed = True
        self._wake()  # waiting followers retry and learn the store is closed
        if self._watcher is not None:
            self._watcher.stop()
        await asyncio.get_running_loop().run_in_executor(
            self._executor, self._close_connection
        )
        self._executor.shutdown(wait=True)

    async def _run(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        """Run one operation on the store's thread; SQLite failures mean unavailable."""
        if self._closed:
            raise StoreUnavailable("the store is closed")

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._executor, lambda: operation(self._connection())
            )
        except (sqlite3.OperationalError, OSError) as exc:
            raise StoreUnavailable(f"embedded store: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        """The worker thread's connection, opened (and the schema made) on first use."""
        if self._conn is None:
            self._conn = _connect(self.path)
        return self._conn

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _start_watcher(self) -> None:
        if self._watcher is None and not self._closed:
            loop = asyncio.get_running_loop()
            self._watcher = _Watcher(
                self.path,
                self._poll_interval_s,
                self._quiet_poll_interval_s,
                lambda: loop.call_soon_threadsafe(self._wake),
            )

    def _wake(self) -> None:
        """Release every follower waiting for a change."""
        self._changed.set()
        self._changed = asyncio.Event()


class _Commit(msgspec.Struct, frozen=True):
    """One commit, run on the store's thread inside a single write transaction."""

    environment: str
    records: dict[str, bytes | None]
    policies: dict[str, bytes | None]
    expect: dict[str, bytes | None]
    log_size: int

    def run(self, conn: sqlite3.Connection) -> int:
        with _transaction(conn, "IMMEDIATE"):
            for key, value in self.expect.items():
                if _get(conn, key) != value:
                    raise StoreConflict(key)

            for key, record in self.records.items():
                _write_record(conn, key, record)
            for key, policy in self.policies.items():
                _write_policy(conn, self.environment, key, policy)

            revision = _bump_revision(conn, self.environment)
            _append_change(conn, self.environment, revision, self.policies)
            _trim_changes(conn, self.environment, revision - self.log_size)
        return revision


class _Watcher:
    """A thread that notices commits of any process and calls back on each."""

    def __init__(
        self,
        path: Path,
        interval_s: float,
        quiet_interval_s: float,
        on_change: Callable[[], object],
    ) -> None:
        self._path = path
        self._interval_s = interval_s
        self._quiet_interval_s = quiet_interval_s
        self.polls = 0
        self._on_change = on_change
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._watch, name="agw-store-watch", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()

    def _watch(self) -> None:
        conn = _connect(self._path)
        try:
            self._poll(conn)
        except RuntimeError:
            pass  # the event loop closed under us: nobody is following any more
        finally:
            conn.close()

    def _poll(self, conn: sqlite3.Connection) -> None:
        last = None
        interval = self._interval_s
        while not self._stopping.wait(interval):
            self.polls += 1
            try:
                version = conn.execute("PRAGMA data_version").fetchone()[0]
            except sqlite3.Error:
                version = None  # followers retry and see the failure themselves

            if version != last or version is None:
                last = version
                interval = self._interval_s
                self._on_change()
            else:
                interval = next_interval(interval, self._quiet_interval_s)


def next_interval(interval_s: float, quiet_interval_s: float) -> float:
    """The wait before the next poll after one that found no change."""
    return min(interval_s * 2, quiet_interval_s)


def _connect(path: Path) -> sqlite3.Connection:
    """Open the database, creating the directory and the schema if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    _enable_wal(conn)
    conn.execute("PRAGMA synchronous = FULL")

    with _transaction(conn, "IMMEDIATE"):
        for statement in _SCHEMA:
            conn.execute(statement)
    return conn


def _enable_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL mode, waiting out another process doing the same.

    Changing the journal mode of a new database fails at once, without the busy
    handler, while a second connection opens it; so retry until the deadline.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


@contextmanager
def _transaction(conn: sqlite3.Connection, mode: str = "DEFERRED") -> Iterator[None]:
    """One SQLite transaction: committed on success, rolled back on any error."""
    conn.execute(f"BEGIN {mode}")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _get(conn: sqlite3.Connection, key: str) -> bytes | None:
    row = conn.execute("SELECT value FROM records WHERE key = ?", (key,)).fetchone()
    return None if row is None else bytes(row[0])


def _scan(conn: sqlite3.Connection, prefix: str) -> dict[str, bytes]:
    end = _prefix_end(prefix)
    if end is None:
        rows = conn.execute(
            "SELECT key, value FROM records WHERE key >= ? ORDER BY key", (prefix,)
        )
    else:
        rows = conn.execute(
            "SELECT key, value FROM records WHERE key >= ? AND key < ? ORDER BY key",
            (prefix, end),
        )
    return {key: bytes(value) for key, value in rows}


def _prefix_end(prefix: str) -> str | None:
    """The smallest string above every string that starts with ``prefix``.

    SQLite compares text as UTF-8 bytes, which orders like code points, so the
    prefix with its last character incremented bounds the range. None: no bound.
    """
    stripped = prefix.rstrip(chr(0x10FFFF))
    if not stripped:
        return None

    following = ord(stripped[-1]) + 1
    if 0xD800 <= following <= 0xDFFF:
        following = 0xE000  # surrogates cannot be encoded; skip past them
    return stripped[:-1] + chr(following)


def _put(conn: sqlite3.Connection, key: str, value: bytes) -> None:
    _write_record(conn, key, value)


def _delete(conn: sqlite3.Connection, key: str) -> bool:
    cursor = conn.execute("DELETE FROM records WHERE key = ?", (key,))
    return cursor.rowcount > 0


def _write_record(conn: sqlite3.Connection, key: str, value: bytes | None) -> None:
    if value is None:
        conn.execute("DELETE FROM records WHERE key = ?", (key,))
    else:
        conn.execute(
            "INSERT INTO records (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, bytes(value)),
        )


def _write_policy(
    conn: sqlite3.Connection, environment: str, key: str, value: bytes | None
) -> None:
    if value is None:
        conn.execute(
            "DELETE FROM policies WHERE environment = ? AND key = ?",
            (environment, key),
        )
    else:
        conn.execute(
            "INSERT INTO policies (environment, key, value) VALUES (?, ?, ?) "
            "ON CONFLICT (environment, key) DO UPDATE SET value = excluded.value",
            (environment, key, bytes(value)),
        )


def _bump_revision(conn: sqlite3.Connection, environment: str) -> int:
    row = conn.execute(
        "INSERT INTO revisions (environment, revision) VALUES (?, 1) "
        "ON CONFLICT (environment) DO UPDATE SET revision = revision + 1 "
        "RETURNING revision",
        (environment,),
    ).fetchone()
    return int(row[0])


def _append_change(
    conn: sqlite3.Connection,
    environment: str,
    revision: int,
    writes: Mapping[str, bytes | None],
) -> None:
    conn.execute(
        "INSERT INTO changes (environment, revision, writes) VALUES (?, ?, ?)",
        (environment, revision, _encode_writes(dict(writes))),
    )


def _trim_changes(conn: sqlite3.Connection, environment: str, upto: int) -> None:
    conn.execute(
        "DELETE FROM changes WHERE environment = ? AND revision <= ?",
        (environment, upto),
    )


def _revision(conn: sqlite3.Connection, environment: str) -> int:
    row = conn.execute(
        "SELECT revision FROM revisions WHERE environment = ?", (environment,)
    ).fetchone()
    return 0 if row is None else int(row[0])


def _snapshot(conn: sqlite3.Connection, environment: str) -> Snapshot:
    with _transaction(conn):
        revision = _revision(conn, environment)
        rows = conn.execute(
            "SELECT key, value FROM policies WHERE environment = ?", (environment,)
        )
        policies = {key: bytes(value) for key, value in rows}
    return Snapshot(revision=revision, policies=policies)


def _changes_after(
    conn: sqlite3.Connection, *, environment: str, after: int
) -> list[Change]:
    """The next changes after ``after``; StoreGap if the log cannot continue it."""
    with _transaction(conn):
        revision = _revision(conn, environment)
        rows = conn.execute(
            "SELECT revision, writes FROM changes "
            "WHERE environment = ? AND revision > ? ORDER BY revision LIMIT ?",
            (environment, after, FOLLOW_BATCH),
        ).fetchall()

    # A log that starts later was trimmed; a revision below ``after`` means the
    # store was replaced. Either way only a fresh snapshot can continue.
    if (rows and rows[0][0] != after + 1) or (not rows and revision != after):
        store_log.info(
            "change log of %s cannot continue after revision %d (now %d)",
            environment,
            after,
            revision,
        )
        raise StoreGap(f"{environment}: no change log after revision {after}")
    return [Change(revision=r, writes=_decode_writes(w)) for r, w in rows]


def _heartbeat(
    conn: sqlite3.Connection,
    environment: str,
    worker_id: str,
    document: bytes,
    ttl_s: float,
) -> None:
    now = time.time()
    with _transaction(conn, "IMMEDIATE"):
        conn.execute(
            "DELETE FROM workers WHERE environment = ? AND expires_at <= ?",
            (environment, now),
        )
        conn.execute(
            "INSERT INTO workers (environment, id, document, expires_at) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (environment, id) DO UPDATE SET "
            "document = excluded.document, expires_at = excluded.expires_at",
            (environment, worker_id, document, now + ttl_s),
        )


def _forget_worker(conn: sqlite3.Connection, environment: str, worker_id: str) -> None:
    conn.execute(
        "DELETE FROM workers WHERE environment = ? AND id = ?",
        (environment, worker_id),
    )


def _workers(conn: sqlite3.Connection, environment: str) -> list[WorkerInfo]:
    # Expired rows are filtered here and purged by the next heartbeat, so
    # reading the list never needs the write lock.
    rows = conn.execute(
        "SELECT document FROM workers WHERE environment = ? AND expires_at > ? "
        "ORDER BY id",
        (environment, time.time()),
    )
    return [_decode_worker(document) for (document,) in rows]
