"""The embedded store's own behaviour: several processes, files, closing."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from pathlib import Path

import pytest

from gateway.store import Change, StoreUnavailable
from gateway.store.embedded import EmbeddedStore, next_interval
from tests.gateway.test_store import PATIENCE_S, take

ROOT = Path(__file__).resolve().parents[2]

# A second OS process on the same database: opens it, says so, then commits
# the records named on its command line, one commit each.
CHILD = """
import asyncio, sys
from gateway.store.embedded import EmbeddedStore

async def main() -> None:
    store = EmbeddedStore(sys.argv[1])
    await store.revision("dev")
    print("ready", flush=True)
    sys.stdin.readline()
    for key in sys.argv[2:]:
        value = None if key.startswith("-") else b"child"
        await store.commit("dev", records={key: b"x"}, policies={key: value})
    await store.close()

asyncio.run(main())
"""


async def start_child(directory: Path, *keys: str) -> asyncio.subprocess.Process:
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(directory),
        *keys,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    assert child.stdout is not None
    async with asyncio.timeout(PATIENCE_S):
        assert await child.stdout.readline() == b"ready\n"
    return child


async def release(child: asyncio.subprocess.Process) -> None:
    assert child.stdin is not None
    child.stdin.write(b"go\n")
    await child.stdin.drain()


async def test_embedded_store_commits_from_two_processes_lose_none(
    embedded_path: Path,
) -> None:
    store = EmbeddedStore(embedded_path)
    child = await start_child(embedded_path, *(f"c{n:02}" for n in range(25)))
    try:
        await release(child)
        ours = [
            await store.commit("dev", records={f"p{n:02}": b"x"}) for n in range(25)
        ]
        async with asyncio.timeout(PATIENCE_S):
            assert await child.wait() == 0

        changes = await take(store.follow("dev", 0), 50)
    finally:
        await store.close()

    assert len(set(ours)) == 25
    assert [change.revision for change in changes] == list(range(1, 51))
    assert sum(1 for change in changes if change.writes) == 25


async def test_embedded_store_follow_sees_another_process(
    embedded_path: Path,
) -> None:
    store = EmbeddedStore(embedded_path)
    try:
        await store.commit("dev", policies={"agent/p/a": b"mine"})
        follower = asyncio.create_task(take(store.follow("dev", 1), 2))
        child = await start_child(embedded_path, "agent/p/b", "-agent/p/a")
        await release(child)
        changes = await follower
        assert await child.wait() == 0
    finally:
        await store.close()

    assert changes == [
        Change(revision=2, writes={"agent/p/b": b"child"}),
        Change(revision=3, writes={"-agent/p/a": None}),
    ]


async def test_embedded_store_creates_directory_in_wal_mode(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b"
    store = EmbeddedStore(directory)
    await store.put("k", b"v")
    await store.close()

    with sqlite3.connect(directory / "store.sqlite3") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()


async def test_embedded_store_closed_is_unavailable(embedded_path: Path) -> None:
    store = EmbeddedStore(embedded_path)
    await store.put("k", b"v")
    await store.close()
    await store.close()

    with pytest.raises(StoreUnavailable):
        await store.get("k")


async def test_embedded_store_close_ends_waiting_followers(
    embedded_path: Path,
) -> None:
    store = EmbeddedStore(embedded_path)
    follower = asyncio.create_task(take(store.follow("dev", 0), 1))
    await store.revision("dev")
    await asyncio.sleep(0.05)  # let the follower reach its wait

    await store.close()

    with pytest.raises(StoreUnavailable):
        await follower


def test_embedded_store_rejects_empty_change_log(embedded_path: Path) -> None:
    with pytest.raises(ValueError, match="change_log_size"):
        EmbeddedStore(embedded_path, change_log_size=0)


def test_embedded_store_watcher_slows_down_while_nothing_changes() -> None:
    intervals = [0.005]
    for _ in range(4):
        intervals.append(next_interval(intervals[-1], 0.025))
    assert intervals == [0.005, 0.01, 0.02, 0.025, 0.025]


async def test_embedded_store_quiet_watcher_polls_at_the_quiet_interval(
    embedded_path: Path,
) -> None:
    store = EmbeddedStore(
        embedded_path, poll_interval_s=0.001, quiet_poll_interval_s=0.05
    )
    follower = asyncio.create_task(take(store.follow("dev", 0), 1))
    try:
        await store.revision("dev")
        await asyncio.sleep(0.2)  # the watcher is started and has slowed down
        assert store._watcher is not None
        before = store._watcher.polls
        await asyncio.sleep(0.5)
        polls = store._watcher.polls - before
    finally:
        follower.cancel()
        await store.close()

    # Each wait lasts at least its interval: at most 0.5 s / 50 ms polls (and
    # one more for a wait under way), where the 1 ms base rate would be ~500.
    assert 1 <= polls <= 11
