"""The store contract, run against both backends (gateway/store/)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.store import (
    Change,
    Snapshot,
    Store,
    StoreConflict,
    StoreGap,
    WorkerInfo,
    open_store,
)
from gateway.store.embedded import EmbeddedStore
from gateway.store.redis import RedisStore

# Guards against a hang, never a speed assertion.
PATIENCE_S = 10


def open_with_log_size(location: str, size: int) -> Store:
    if location.startswith("redis://"):
        return RedisStore(location, change_log_size=size)
    return EmbeddedStore(location, change_log_size=size)


async def take(changes: AsyncIterator[Change], count: int) -> list[Change]:
    taken: list[Change] = []
    try:
        async with asyncio.timeout(PATIENCE_S):
            async for change in changes:
                taken.append(change)
                if len(taken) == count:
                    break
    finally:
        await changes.aclose()  # type: ignore[attr-defined]
    return taken


def worker(worker_id: str, revision: int = 1) -> WorkerInfo:
    return WorkerInfo(
        id=worker_id, host="host-1", pid=4242, revision=revision, last_seen=1.5
    )


async def test_store_get_missing_is_none(store: Store) -> None:
    assert await store.get("agents/p/missing") is None


async def test_store_put_get_delete(store: Store) -> None:
    await store.put("projects/p", b'{"name":"p"}')
    await store.put("projects/p", b'{"name":"p2"}')

    assert await store.get("projects/p") == b'{"name":"p2"}'
    assert await store.delete("projects/p") is True
    assert await store.delete("projects/p") is False
    assert await store.get("projects/p") is None
    assert await store.scan("projects/") == {}


async def test_store_scan_stops_at_prefix_boundary(store: Store) -> None:
    for key in ["agents/ab/x", "agents/a/y", "agents/a", "agents/a/x", "agentsa/a/"]:
        await store.put(key, key.encode())

    found = await store.scan("agents/a/")

    assert list(found.items()) == [
        ("agents/a/x", b"agents/a/x"),
        ("agents/a/y", b"agents/a/y"),
    ]


async def test_store_scan_sorts_by_code_point(store: Store) -> None:
    for key in ["k/z", "k/\u00e9", "k/A", "k/a", "k/\U0001f600"]:
        await store.put(key, b"v")

    found = await store.scan("k/")

    assert list(found) == ["k/A", "k/a", "k/z", "k/\u00e9", "k/\U0001f600"]


async def test_store_scan_empty_prefix_lists_everything(store: Store) -> None:
    await store.put("b", b"2")
    await store.put("a", b"1")

    assert list((await store.scan("")).items()) == [("a", b"1"), ("b", b"2")]


async def test_store_keys_and_values_are_taken_literally(store: Store) -> None:
    keys = ["x/[a", "x/(b", "x/*", "x/%_", "x/a\\b", "x/-", "x/+", "x/\u00ff"]
    for n, key in enumerate(keys):
        await store.put(key, bytes([0, 255, n]))
    await store.put("x", b"outside")

    assert await store.scan("x/[") == {"x/[a": bytes([0, 255, 0])}
    assert await store.scan("x/") == {
        key: bytes([0, 255, n])
        for n, key in sorted(enumerate(keys), key=lambda kv: kv[1])
    }
    assert await store.get("x/*") == bytes([0, 255, 2])


async def test_store_commit_bumps_revision_by_one_per_call(store: Store) -> None:
    assert await store.revision("dev") == 0

    revisions = [await store.commit("dev") for _ in range(3)]

    assert revisions == [1, 2, 3]
    assert await store.revision("dev") == 3
    assert await store.revision("prod") == 0


async def test_store_commit_writes_records_and_policies(store: Store) -> None:
    await store.put("agents/p/old", b"old")

    revision = await store.commit(
        "dev",
        records={"agents/p/a": b"record", "agents/p/old": None},
        policies={"agent/p/a": b"policy", "agent/p/gone": None},
    )

    assert revision == 1
    assert await store.scan("agents/p/") == {"agents/p/a": b"record"}
    assert await store.snapshot("dev") == Snapshot(
        revision=1, policies={"agent/p/a": b"policy"}
    )
    assert await store.snapshot("prod") == Snapshot(revision=0, policies={})


async def test_store_commit_conflict_writes_nothing(store: Store) -> None:
    await store.commit("dev", records={"agents/p/a": b"v1"})

    with pytest.raises(StoreConflict) as caught:
        await store.commit(
            "dev",
            records={"agents/p/a": b"v2", "agents/p/b": b"new"},
            policies={"agent/p/a": b"policy"},
            expect={"agents/p/b": None, "agents/p/a": b"v0"},
        )

    assert caught.value.key == "agents/p/a"
    assert await store.scan("agents/") == {"agents/p/a": b"v1"}
    assert await store.snapshot("dev") == Snapshot(revision=1, policies={})


async def test_store_commit_conflict_when_expected_absent(store: Store) -> None:
    await store.put("projects/p", b"taken")

    with pytest.raises(StoreConflict) as caught:
        await store.commit(
            "dev", records={"projects/p": b"x"}, expect={"projects/p": None}
        )

    assert caught.value.key == "projects/p"
    assert await store.get("projects/p") == b"taken"


async def test_store_commit_with_met_expectations(store: Store) -> None:
    await store.put("agents/p/a", b"v1")

    revision = await store.commit(
        "dev",
        records={"agents/p/a": b"v2"},
        expect={"agents/p/a": b"v1", "agents/p/b": None},
    )

    assert revision == 1
    assert await store.get("agents/p/a") == b"v2"


async def test_store_concurrent_commits_from_two_instances_lose_none(
    store: Store, store_location: str
) -> None:
    other = open_store(store_location)

    async def commit(target: Store, n: int) -> int:
        return await target.commit(
            "dev", records={f"r/{n:02}": b"x"}, policies={f"p/{n:02}": b"y"}
        )

    try:
        revisions = await asyncio.gather(
            *(commit(store if n % 2 else other, n) for n in range(50))
        )
    finally:
        await other.close()

    assert sorted(revisions) == list(range(1, 51))
    assert len(await store.scan("r/")) == 50
    changes = await take(store.follow("dev", 0), 50)
    assert [change.revision for change in changes] == list(range(1, 51))
    assert sorted(k for change in changes for k in change.writes) == [
        f"p/{n:02}" for n in range(50)
    ]


async def test_store_expectations_let_one_racing_creator_win(
    store: Store, store_location: str
) -> None:
    other = open_store(store_location)

    async def create(target: Store, n: int) -> int | None:
        try:
            return await target.commit(
                "dev",
                records={"projects/p": str(n).encode()},
                expect={"projects/p": None},
            )
        except StoreConflict:
            return None

    try:
        results = await asyncio.gather(
            *(create(store if n % 2 else other, n) for n in range(10))
        )
    finally:
        await other.close()

    winners = [n for n, revision in enumerate(results) if revision is not None]
    assert len(winners) == 1
    assert await store.get("projects/p") == str(winners[0]).encode()
    assert await store.revision("dev") == 1


async def test_store_follow_yields_commits_of_another_instance(
    store: Store, store_location: str
) -> None:
    await store.commit("dev", policies={"agent/p/a": b"1"})
    follower = asyncio.create_task(take(store.follow("dev", 1), 3))
    other = open_store(store_location)
    try:
        await other.commit("dev", policies={"agent/p/a": b"2", "idp/x": b"i"})
        await other.commit("prod", policies={"agent/p/a": b"elsewhere"})
        await other.commit("dev", policies={"agent/p/a": None})
        await other.commit("dev")
        changes = await follower
    finally:
        await other.close()

    assert changes == [
        Change(revision=2, writes={"agent/p/a": b"2", "idp/x": b"i"}),
        Change(revision=3, writes={"agent/p/a": None}),
        Change(revision=4, writes={}),
    ]


async def test_store_follow_starts_after_the_given_revision(store: Store) -> None:
    for n in range(1, 5):
        await store.commit("dev", policies={"k": str(n).encode()})

    changes = await take(store.follow("dev", 2), 2)

    assert changes == [
        Change(revision=3, writes={"k": b"3"}),
        Change(revision=4, writes={"k": b"4"}),
    ]


async def test_store_follow_raises_gap_after_trim(store_location: str) -> None:
    store = open_with_log_size(store_location, 3)
    try:
        for _ in range(6):
            await store.commit("dev", policies={"k": b"v"})

        with pytest.raises(StoreGap):
            await take(store.follow("dev", 1), 1)
        assert [c.revision for c in await take(store.follow("dev", 3), 3)] == [4, 5, 6]
    finally:
        await store.close()


async def test_store_follow_raises_gap_when_revision_behind(store: Store) -> None:
    # A follower ahead of the store saw a store that was since replaced.
    await store.commit("dev")

    with pytest.raises(StoreGap):
        await take(store.follow("dev", 5), 1)


async def test_store_snapshot_matches_follow_position(store: Store) -> None:
    await store.commit("dev", policies={"a": b"1", "b": b"2"})
    await store.commit("dev", policies={"a": None})

    snapshot = await store.snapshot("dev")
    follower = asyncio.create_task(take(store.follow("dev", snapshot.revision), 1))
    await store.commit("dev", policies={"c": b"3"})

    assert snapshot == Snapshot(revision=2, policies={"b": b"2"})
    assert await follower == [Change(revision=3, writes={"c": b"3"})]


async def test_store_heartbeat_lists_live_workers_sorted(store: Store) -> None:
    await store.heartbeat("dev", worker("w-b"), 30)
    await store.heartbeat("dev", worker("w-a"), 30)
    await store.heartbeat("dev", worker("w-a", revision=7), 30)
    await store.heartbeat("prod", worker("w-c"), 30)

    assert await store.workers("dev") == [worker("w-a", revision=7), worker("w-b")]


async def test_store_heartbeat_expires(store: Store) -> None:
    await store.heartbeat("dev", worker("w-short"), 0.05)
    await store.heartbeat("dev", worker("w-long"), 30)
    await asyncio.sleep(0.2)

    assert await store.workers("dev") == [worker("w-long")]


async def test_store_forget_worker(store: Store) -> None:
    await store.heartbeat("dev", worker("w-a"), 30)
    await store.heartbeat("dev", worker("w-b"), 30)

    await store.forget_worker("dev", "w-a")
    await store.forget_worker("dev", "w-unknown")

    assert await store.workers("dev") == [worker("w-b")]


async def test_store_data_survives_close_and_reopen(
    store: Store, store_location: str
) -> None:
    await store.put("projects/p", b"p")
    await store.commit("dev", records={"agents/p/a": b"a"}, policies={"k": b"v"})
    await store.close()

    reopened = open_store(store_location)
    try:
        assert await reopened.scan("") == {"agents/p/a": b"a", "projects/p": b"p"}
        assert await reopened.snapshot("dev") == Snapshot(
            revision=1, policies={"k": b"v"}
        )
        assert await reopened.commit("dev") == 2
    finally:
        await reopened.close()
