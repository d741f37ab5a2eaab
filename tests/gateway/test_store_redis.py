"""The Redis store's own behaviour: URLs, key prefixes, outages."""

from __future__ import annotations

import asyncio

import pytest
import redis

from gateway.store import Snapshot, StoreUnavailable, WorkerInfo
from gateway.store.redis import RedisStore, split_prefix
from tests.fixtures.ports import free_port
from tests.fixtures.stores import RedisServer
from tests.gateway.test_store import PATIENCE_S, take


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://h:6379/0", ("redis://h:6379/0", "agw")),
        ("redis://h/1?prefix=blue", ("redis://h/1", "blue")),
        (
            "rediss://u:p@h/0?ssl_cert_reqs=none&prefix=a.b-c_1",
            ("rediss://u:p@h/0?ssl_cert_reqs=none", "a.b-c_1"),
        ),
        ("unix:///run/redis.sock?db=2&prefix=x", ("unix:///run/redis.sock?db=2", "x")),
    ],
)
def test_split_prefix(url: str, expected: tuple[str, str]) -> None:
    assert split_prefix(url) == expected


@pytest.mark.parametrize("prefix", ["", "a*", "a:b", "-a", "a b", "x" * 65])
def test_split_prefix_rejects_unsafe_prefix(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        split_prefix(f"redis://h/0?prefix={prefix}")


async def test_redis_store_over_unix_socket(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.unix_url)
    try:
        assert await store.commit("dev", policies={"k": b"v"}) == 1
    finally:
        await store.close()

    tcp = RedisStore(redis_server.url)
    try:
        assert await tcp.snapshot("dev") == Snapshot(revision=1, policies={"k": b"v"})
    finally:
        await tcp.close()


async def test_redis_store_prefixes_keep_installations_apart(redis_url: str) -> None:
    blue = RedisStore(redis_url)
    green = RedisStore(redis_url.replace("?prefix=", "?prefix=green"))
    try:
        await blue.put("projects/p", b"blue")
        await blue.commit("dev", policies={"k": b"v"})

        assert await green.scan("") == {}
        assert await green.revision("dev") == 0
    finally:
        await _delete_prefix(green.prefix)  # the fixture empties only its own
        await blue.close()
        await green.close()


async def test_redis_store_keys_stay_under_prefix(redis_url: str) -> None:
    store = RedisStore(redis_url)
    try:
        await store.put("projects/p", b"p")
        await store.commit("dev", records={"agents/p/a": b"a"}, policies={"k": b"v"})
        await store.heartbeat("dev", _worker(), 30)
    finally:
        await store.close()

    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        keys = sorted(client.scan_iter(match=f"{store.prefix}:*"))
    finally:
        client.close()
    assert [key.decode().removeprefix(store.prefix) for key in keys] == [
        ":env:dev:changes",
        ":env:dev:policies",
        ":env:dev:revision",
        ":env:dev:workers",
        ":env:dev:workers:expiry",
        ":records",
        ":records:index",
    ]


async def test_redis_store_unavailable_while_server_down_then_recovers(
    redis_server: RedisServer,
) -> None:
    store = RedisStore(redis_server.url)
    try:
        await store.put("projects/p", b"p")
        redis_server.stop()

        with pytest.raises(StoreUnavailable):
            await store.get("projects/p")
        with pytest.raises(StoreUnavailable):
            await store.commit("dev")
        with pytest.raises(StoreUnavailable):
            await store.workers("dev")

        redis_server.start()
        assert await store.commit("dev", records={"projects/p": b"again"}) == 1
        assert await store.get("projects/p") == b"again"
    finally:
        await store.close()


async def test_redis_store_follow_unavailable_when_server_stops(
    redis_server: RedisServer,
) -> None:
    store = RedisStore(redis_server.url)
    try:
        await store.commit("dev")
        follower = asyncio.create_task(take(store.follow("dev", 1), 1))
        await asyncio.sleep(0.05)  # let the follower block in XREAD
        redis_server.stop()

        with pytest.raises(StoreUnavailable):
            await follower
    finally:
        await store.close()


async def test_redis_store_unavailable_when_nothing_listens() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0?prefix=agwtest")
    try:
        with pytest.raises(StoreUnavailable):
            await store.revision("dev")
        with pytest.raises(StoreUnavailable):
            async with asyncio.timeout(PATIENCE_S):
                await take(store.follow("dev", 0), 1)
    finally:
        await store.close()


def _worker() -> WorkerInfo:
    return WorkerInfo(id="w", host="h", pid=1, revision=0, last_seen=0.0)


async def _delete_prefix(prefix: str) -> None:
    client = redis.asyncio.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
