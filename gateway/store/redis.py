"""The Redis store: production, shared by any number of hosts.

Layout, every key under ``<prefix>:`` (the URL's ``prefix`` query parameter,
default ``agw``) so several installations can share one Redis:

- ``records``: hash of record key -> value; ``records:index``: sorted set of
  the same keys, all at score 0, so a prefix is listed with ZRANGEBYLEX
  without walking the keyspace;
- ``env:<environment>:policies``: hash of policy key -> value;
- ``env:<environment>:revision``: the environment's revision counter;
- ``env:<environment>:changes``: the change log, a stream whose entry id is
  ``<revision>-0`` and whose one field ``writes`` holds the Change's writes as
  msgpack (bytes and None stay apart without base64); capped at the last
  ``change_log_size`` entries;
- ``env:<environment>:workers``: hash of worker id -> WorkerInfo JSON, with
  ``env:<environment>:workers:expiry``, a sorted set of expiry times taken
  from the Redis clock so the hosts' clocks need not agree.

A commit is one Lua script, hence atomic. Commands are never retried by the
client: a commit whose reply was lost may have run, and running it twice
would bump the revision twice. Any connection failure or timeout is raised
as StoreUnavailable; the next call reconnects.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode

import msgspec
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.log import store_log
from gateway.store import (
    Change,
    Snapshot,
    StoreConflict,
    StoreGap,
    StoreUnavailable,
    WorkerInfo,
)

__all__ = ["RedisStore", "split_prefix"]

DEFAULT_PREFIX = "agw"
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 5.0
# A blocking read must return before the socket's read timeout fires.
FOLLOW_BLOCK_MS = 1_000
FOLLOW_BATCH = 512

_PREFIX_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

_UNAVAILABLE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,
    OSError,
)

_encode_writes = msgspec.msgpack.Encoder().encode
_decode_writes = msgspec.msgpack.Decoder(dict[str, bytes | None]).decode
_decode_worker = msgspec.json.Decoder(WorkerInfo).decode

# KEYS: records, records index, policies, revision, changes.
# ARGV: change log size, encoded writes, then three groups (expectations,
# records, policies), each a count followed by (key, present, value) triples.
# Reads and the XADD (which fails if the log is ahead of the counter) come
# before any write, because Redis does not undo a script's earlier writes.
_COMMIT_LUA = """
local pos = 3
local function group()
  local count = tonumber(ARGV[pos])
  local first = pos + 1
  pos = first + 3 * count
  return first, count
end

local first, count = group()
for at = first, first + 3 * (count - 1), 3 do
  local current = redis.call('HGET', KEYS[1], ARGV[at])
  if ARGV[at + 1] == '1' then
    if current ~= ARGV[at + 2] then return {0, ARGV[at]} end
  elseif current then
    return {0, ARGV[at]}
  end
end

local revision = (tonumber(redis.call('GET', KEYS[4])) or 0) + 1
redis.call('XADD', KEYS[5], 'MAXLEN', ARGV[1], revision .. '-0',
           'writes', ARGV[2])

first, count = group()
for at = first, first + 3 * (count - 1), 3 do
  if ARGV[at + 1] == '1' then
    redis.call('HSET', KEYS[1], ARGV[at], ARGV[at + 2])
    redis.call('ZADD', KEYS[2], 0, ARGV[at])
  else
    redis.call('HDEL', KEYS[1], ARGV[at])
    redis.call('ZREM', KEYS[2], ARGV[at])
  end
end

first, count = group()
for at = first, first + 3 * (count - 1), 3 do
  if ARGV[at + 1] == '1' then
    redis.call('HSET', KEYS[3], ARGV[at], ARGV[at + 2])
  else
    redis.call('HDEL', KEYS[3], ARGV[at])
  end
end

redis.call('SET', KEYS[4], revision)
return {1, revision}
"""

# KEYS: records, records index. ARGV: ZRANGEBYLEX bounds. Flat key, value list.
_SCAN_LUA = """
local found = {}
for _, key in ipairs(redis.call('ZRANGEBYLEX', KEYS[2], ARGV[1], ARGV[2])) do
  local value = redis.call('HGET', KEYS[1], key)
  if value then
    found[#found + 1] = key
    found[#found + 1] = value
  end
end
return found
"""

_NOW_LUA = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
"""

# KEYS: workers, workers expiry. ARGV: worker id, ttl seconds, document.
_HEARTBEAT_LUA = (
    _NOW_LUA
    + """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
"""
)

# KEYS: workers, workers expiry. Purges expired workers, returns the rest.
_WORKERS_LUA = (
    _NOW_LUA
    + """
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
end
return redis.call('HVALS', KEYS[1])
"""
)


def split_prefix(url: str) -> tuple[str, str]:
    """Split a store URL into the URL for redis-py and the key prefix."""
    # Split by hand: urlunsplit would turn ``unix:///path`` into ``unix:/path``.
    base, _, rest = url.partition("?")
    query_text, hash_mark, fragment = rest.partition("#")
    query = parse_qsl(query_text, keep_blank_values=True)
    prefixes = [value for name, value in query if name == "prefix"]
    prefix = prefixes[-1] if prefixes else DEFAULT_PREFIX
    if not _PREFIX_RE.fullmatch(prefix):
        raise ValueError(
            "the store URL's prefix must be 1-64 letters, digits, '_', '.' or '-'"
        )

    kept = urlencode([(name, value) for name, value in query if name != "prefix"])
    return base + ("?" + kept if kept else "") + hash_mark + fragment, prefix


class RedisStore:
    """The store on Redis; every process of every host may open it."""

    def __init__(
        self,
        url: str,
        *,
        change_log_size: int = 10_000,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        read_timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        if change_log_size < 1:
            raise ValueError("change_log_size must be at least 1")

        self._url, self.prefix = split_prefix(url)
        self._log_size = change_log_size
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._redis = self._client(read_timeout_s)
        self._followers: set[aioredis.Redis] = set()
        self._commit = self._redis.register_script(_COMMIT_LUA)
        self._scan = self._redis.register_script(_SCAN_LUA)
        self._heartbeat = self._redis.register_script(_HEARTBEAT_LUA)
        self._workers = self._redis.register_script(_WORKERS_LUA)

    async def get(self, key: str) -> bytes | None:
        with _unavailable():
            value = await self._redis.hget(self._records, key)
        # The client never decodes replies, so values come back as bytes.
        return cast("bytes | None", value)

    async def scan(self, prefix: str) -> dict[str, bytes]:
        low = b"[" + prefix.encode()
        # No UTF-8 text holds the byte 0xff, so this bounds every longer key.
        high = b"(" + prefix.encode() + b"\xff"
        with _unavailable():
            flat = await self._scan(
                keys=[self._records, self._records_index], args=[low, high]
            )
        return {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}

    async def put(self, key: str, value: bytes) -> None:
        with _unavailable():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(self._records, key, value)
                pipe.zadd(self._records_index, {key: 0})
                await pipe.execute()

    async def delete(self, key: str) -> bool:
        with _unavailable():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hdel(self._records, key)
                pipe.zrem(self._records_index, key)
                removed, _ = await pipe.execute()
        return bool(removed)

    async def commit(
        self,
        environment: str,
        *,
        records: Mapping[str, bytes | None] | None = None,
        policies: Mapping[str, bytes | None] | None = None,
        expect: Mapping[str, bytes | None] | None = None,
    ) -> int:
        writes = dict(policies or {})
        args: list[bytes | str | int] = [self._log_size, _encode_writes(writes)]
        for group in (expect or {}, records or {}, writes):
            args.extend(_triples(group))

        with _unavailable():
            ok, detail = await self._commit(
                keys=self._commit_keys(environment), args=args
            )
        if not ok:
            raise StoreConflict(detail.decode())
        return int(detail)

    async def revision(self, environment: str) -> int:
        with _unavailable():
            value = await self._redis.get(self._env(environment, "revision"))
        return int(value or 0)

    async def snapshot(self, environment: str) -> Snapshot:
        with _unavailable():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.get(self._env(environment, "revision"))
                pipe.hgetall(self._env(environment, "policies"))
                revision, policies = await pipe.execute()
        return Snapshot(
            revision=int(revision or 0),
            policies={key.decode(): value for key, value in policies.items()},
        )

    async def follow(self, environment: str, after: int) -> AsyncIterator[Change]:
        # A blocking read holds its connection, so each follower has its own.
        client = self._client(self._read_timeout_s + FOLLOW_BLOCK_MS / 1000)
        self._followers.add(client)
        try:
            batch = await self._first_changes(client, environment, after)
            while True:
                for change in batch:
                    yield change
                    after = change.revision
                batch = await self._next_changes(client, environment, after)
        finally:
            self._followers.discard(client)
            await client.aclose()

    async def heartbeat(
        self, environment: str, worker: WorkerInfo, ttl_s: float
    ) -> None:
        document = msgspec.json.encode(worker)
        with _unavailable():
            await self._heartbeat(
                keys=self._worker_keys(environment),
                args=[worker.id, repr(float(ttl_s)), document],
            )

    async def forget_worker(self, environment: str, worker_id: str) -> None:
        workers, expiry = self._worker_keys(environment)
        with _unavailable():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hdel(workers, worker_id)
                pipe.zrem(expiry, worker_id)
                await pipe.execute()

    async def workers(self, environment: str) -> list[WorkerInfo]:
        with _unavailable():
            documents = await self._workers(keys=self._worker_keys(environment))
        found = [_decode_worker(document) for document in documents]
        return sorted(found, key=lambda worker: worker.id)

    async def close(self) -> None:
        for client in list(self._followers):
            await client.aclose()
        await self._redis.aclose()

    def _client(self, read_timeout_s: float) -> aioredis.Redis:
        return aioredis.Redis.from_url(
            self._url,
            socket_connect_timeout=self._connect_timeout_s,
            socket_timeout=read_timeout_s,
            retry=Retry(NoBackoff(), 0),
        )

    async def _first_changes(
        self, client: aioredis.Redis, environment: str, after: int
    ) -> list[Change]:
        """The changes right after ``after``, read with the revision at once.

        An empty log alone cannot tell "nothing new" from "trimmed away" or
        "store replaced"; the revision read in the same transaction can.
        """
        with _unavailable():
            async with client.pipeline(transaction=True) as pipe:
                pipe.get(self._env(environment, "revision"))
                pipe.xread(
                    {self._env(environment, "changes"): f"{after}-0"},
                    count=FOLLOW_BATCH,
                )
                revision, reply = await pipe.execute()

        changes = _parse_changes(environment, after, reply)
        if not changes and int(revision or 0) != after:
            raise _gap(environment, after)
        return changes

    async def _next_changes(
        self, client: aioredis.Redis, environment: str, after: int
    ) -> list[Change]:
        with _unavailable():
            reply = await client.xread(
                {self._env(environment, "changes"): f"{after}-0"},
                count=FOLLOW_BATCH,
                block=FOLLOW_BLOCK_MS,
            )
        return _parse_changes(environment, after, reply)

    @property
    def _records(self) -> str:
        return f"{self.prefix}:records"

    @property
    def _records_index(self) -> str:
        return f"{self.prefix}:records:index"

    def _env(self, environment: str, name: str) -> str:
        return f"{self.prefix}:env:{environment}:{name}"

    def _commit_keys(self, environment: str) -> list[str]:
        return [
            self._records,
            self._records_index,
            self._env(environment, "policies"),
            self._env(environment, "revision"),
            self._env(environment, "changes"),
        ]

    def _worker_keys(self, environment: str) -> list[str]:
        return [
            self._env(environment, "workers"),
            self._env(environment, "workers:expiry"),
        ]


@contextmanager
def _unavailable() -> Iterator[None]:
    """Turn connection failures and timeouts into StoreUnavailable."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise StoreUnavailable(f"redis: {exc}") from exc


def _triples(group: Mapping[str, bytes | None]) -> Iterator[bytes | str | int]:
    """A count, then (key, present, value) for each entry: the script's format."""
    yield len(group)
    for key, value in group.items():
        yield key
        yield 0 if value is None else 1
        yield b"" if value is None else value


def _parse_changes(environment: str, after: int, reply: Any) -> list[Change]:
    """Changes from an XREAD reply; StoreGap unless they continue ``after``."""
    if not reply:
        return []

    # RESP2 answers [[stream, entries]]; RESP3 (``protocol=3``) {stream: [entries]}.
    entries = reply[0][1] if isinstance(reply, list) else next(iter(reply.values()))[0]
    changes = []
    for entry_id, fields in entries:
        revision = int(entry_id.split(b"-", 1)[0])
        changes.append(
            Change(revision=revision, writes=_decode_writes(fields[b"writes"]))
        )

    if changes[0].revision != after + 1:
        raise _gap(environment, after)
    return changes


def _gap(environment: str, after: int) -> StoreGap:
    store_log.info(
        "change log of %s cannot continue after revision %d", environment, after
    )
    return StoreGap(f"{environment}: no change log after revision {after}")
