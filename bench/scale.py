"""Scale and latency figures: big environments, changes, token cache, deploys, SSE.

Prints, each bounded in time and count and on 127.0.0.1 only:

- worker RSS and time to ready with ``--agents`` deployed agents (embedded
  store), next to a worker of an empty environment;
- the time to read that environment's snapshot and build the policy table;
- worker CPU time to apply one change in that environment (in process,
  ``time.process_time`` over many repetitions);
- memory held by ``--tokens`` cached verified tokens;
- time from a deploy call to enforcement by two Redis-backed workers
  (median and p99 over ``--deploys`` deploys);
- the delay the gateway adds to each SSE event (p50, p99).

    python -m bench.scale
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import secrets
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from bench.harness import HOST, Stack, free_port, process_tree, wait_for, workdir
from bench.keys import AUDIENCE, ISSUER, SigningKey
from gateway.policy import (
    AgentPolicy,
    ApiKeyPolicy,
    AuthType,
    EndpointAuth,
    IdentityProviderPolicy,
    OAuthSettings,
    agent_key,
    apikey_key,
    encode_policy,
    hash_api_key,
    idp_key,
)
from gateway.store import open_store

__all__ = ["main"]

AGENTS_PER_PROJECT = 100
ANY_CPU = "0-1"


def percentile(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def spread(values: Sequence[float], unit: str = "ms", scale: float = 1e3) -> str:
    return (
        f"p50 {percentile(values, 50) * scale:.2f} {unit}, "
        f"p99 {percentile(values, 99) * scale:.2f} {unit}, "
        f"worst {max(values) * scale:.2f} {unit} (n={len(values)})"
    )


# --- a large environment ------------------------------------------------------


def agent_policy(index: int, upstream: str, revision: int = 1) -> AgentPolicy:
    """Agent ``index``: a third each of none, api_key and oauth."""
    kinds: tuple[AuthType, ...] = ("none", "api_key", "oauth")
    kind = kinds[index % 3]
    oauth = OAuthSettings(identity_providers=["bench-idp"]) if kind == "oauth" else None
    return AgentPolicy(
        project=f"project-{index // AGENTS_PER_PROJECT}",
        agent=f"agent-{index}",
        upstream_url=f"{upstream}/agent-{index}",
        timeout_s=300,
        endpoint_auth=EndpointAuth(type=kind, oauth=oauth),
        revision=revision,
    )


def environment_policies(count: int, upstream: str) -> dict[str, bytes | None]:
    """One identity provider, ``count`` agents and a key for each api_key agent."""
    idp = IdentityProviderPolicy(
        name="bench-idp",
        issuer=ISSUER,
        jwks=SigningKey.generate().jwks(),
        audiences=[AUDIENCE],
        algorithms=["RS256"],
    )
    policies: dict[str, bytes | None] = {idp_key("bench-idp"): encode_policy(idp)}
    for index in range(count):
        policy = agent_policy(index, upstream)
        policies[agent_key(policy.project, policy.agent)] = encode_policy(policy)
        if policy.endpoint_auth.type == "api_key":
            key = ApiKeyPolicy(project=policy.project, agent=policy.agent, name="k")
            policies[apikey_key(hash_api_key(secrets.token_urlsafe(32)))] = (
                encode_policy(key)
            )
    return policies


async def populate(location: str, environment: str, count: int) -> None:
    """Write the environment through ``Store.commit``, 500 policies a commit."""
    store = open_store(location)
    items = list(environment_policies(count, f"http://{HOST}:9").items())
    for start in range(0, len(items), 500):
        await store.commit(environment, policies=dict(items[start : start + 500]))
    await store.close()


def build_table(policies: dict[str, bytes], revision: int) -> Any:
    """The worker's policy table, built the way a worker loads a snapshot."""
    from gateway.oauth import IdentityProviders
    from gateway.policies import PolicyTable

    table = PolicyTable(IdentityProviders())
    table.apply(revision, dict(policies))
    return table


async def snapshot_load(location: str, environment: str) -> Any:
    store = open_store(location)
    started = time.perf_counter()
    snapshot = await store.snapshot(environment)
    read = time.perf_counter() - started
    await store.close()

    started = time.perf_counter()
    table = build_table(snapshot.policies, snapshot.revision)
    built = time.perf_counter() - started
    print(
        f"snapshot of {len(snapshot.policies)} policies: read {read * 1e3:.0f} ms, "
        f"policy table built in {built * 1e3:.0f} ms"
    )
    return table


def apply_cost(table: Any, repetitions: int) -> None:
    """CPU time of one change applied to a loaded table (process_time)."""
    upstream = f"http://{HOST}:9"
    versions = [
        {agent_key("project-0", "agent-2"): encode_policy(agent_policy(2, u))}
        for u in (f"{upstream}/a", f"{upstream}/b")
    ]
    key = apikey_key(hash_api_key(secrets.token_urlsafe(32)))
    kept = ApiKeyPolicy(project="project-0", agent="agent-1", name="rotated")
    keys = [{key: encode_policy(kept)}, {key: None}]
    for name, changes in (("redeploy one oauth agent", versions), ("API key", keys)):
        revision = table.revision
        started = time.process_time()
        for index in range(repetitions):
            revision += 1
            table.apply(revision, changes[index % 2])
        cost = (time.process_time() - started) / repetitions
        print(f"apply one change ({name}): {cost * 1e6:.1f} us CPU")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def worker_rss(stack: Stack, store: str, environment: str, label: str) -> None:
    """Start a gateway on ``environment``; print time to ready and its RSS."""
    port, admin = free_port(), free_port()
    started = time.perf_counter()
    stack.start(f"gateway-{label}", ANY_CPU, [
        sys.executable, "-m", "gateway", "--store", store,
        "--environment", environment, "--host", HOST, "--port", str(port),
        "--admin-port", str(admin), "--workers", "1",
    ])  # fmt: skip
    wait_for(stack, f"http://{HOST}:{admin}/readyz")
    ready = time.perf_counter() - started
    time.sleep(1)
    tree = process_tree(stack.pid(f"gateway-{label}"))
    sizes = ", ".join(f"{rss_kib(pid) / 1024:.1f}" for pid in tree)
    print(f"gateway ({label}): ready in {ready:.2f} s; RSS MiB by process: {sizes}")
    stack.stop(f"gateway-{label}")


async def large_environment(args: argparse.Namespace, stack: Stack) -> None:
    store = str(stack.root / "store")
    started = time.perf_counter()
    await populate(store, "scale", args.agents)
    written = time.perf_counter() - started
    print(f"{args.agents} agents written through Store.commit in {written:.1f} s")

    table = await snapshot_load(store, "scale")
    apply_cost(table, args.repetitions)
    del table
    await populate(store, "empty", 0)
    worker_rss(stack, store, "empty", "1 identity provider, no agent")
    worker_rss(stack, store, "scale", f"{args.agents} agents")


# --- token cache --------------------------------------------------------------


def _fake_token(key: SigningKey, index: int) -> str:
    """A token of real shape and length; its signature is never checked here."""
    real = key.mint(f"user-{index:08d}")
    head, payload, _ = real.split(".")
    signature = base64.urlsafe_b64encode(secrets.token_bytes(256)).rstrip(b"=")
    return f"{head}.{payload}.{signature.decode()}"


def token_cache_memory(count: int) -> None:
    """Bytes held by ``count`` entries of the worker's verified-token cache."""
    from gateway.oauth import IdentityProviders, TokenCache, Verified
    from gateway.tokens import parse_token, read_claims

    key = SigningKey.generate()
    idps = IdentityProviders()
    policy = IdentityProviderPolicy(
        name="bench-idp", issuer=ISSUER, jwks=key.jwks(), algorithms=["RS256"]
    )
    idps.apply("bench-idp", policy)
    state = idps.get("bench-idp")
    assert state is not None
    verification_key = state.keyring.keys.keys[0]
    template = _fake_token(key, 0)

    cache = TokenCache(max_entries=count, max_bytes=1 << 40)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for index in range(count):
        # Distinct subjects make distinct claims, as real callers would.
        token = template[:-12] + f"{index:012d}"
        parsed = parse_token(template)
        claims = read_claims({**parsed.claims, "sub": f"user-{index}"}, ISSUER)
        cache.put(token, Verified(state, verification_key, claims))
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    print(
        f"token cache: {len(cache)} verified tokens ({len(template)} chars each) "
        f"hold {held / 2**20:.1f} MiB, {held / count:.0f} bytes each"
    )


# --- deploys and SSE through Redis-backed workers ----------------------------


class Redis:
    """Two gateway workers and a control plane on Redis under a fresh prefix."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.prefix = f"agwbench-{secrets.token_hex(4)}"
        self.url = f"redis://{HOST}:6379/0?prefix={self.prefix}"
        self.token = secrets.token_urlsafe(32)
        self.ports = {name: free_port() for name in ("cp", "gw", "admin", "up")}
        self.api = f"http://{HOST}:{self.ports['cp']}/api/v1"
        self.gateway = f"http://{HOST}:{self.ports['gw']}"
        self.upstream = f"http://{HOST}:{self.ports['up']}"

    def start(self) -> None:
        token_file = self.stack.root / "admin-token"
        token_file.write_text(self.token)
        self.stack.start("upstream", ANY_CPU, [
            sys.executable, "-m", "bench.upstreams", "--port", str(self.ports["up"]),
        ])  # fmt: skip
        self.stack.start("controlplane", ANY_CPU, [
            sys.executable, "-m", "controlplane", "--store", self.url,
            "--admin-token-file", str(token_file), "--host", HOST,
            "--port", str(self.ports["cp"]),
        ])  # fmt: skip
        self.stack.start("gateways", ANY_CPU, [
            sys.executable, "-m", "gateway", "--store", self.url,
            "--environment", "scale", "--host", HOST, "--port", str(self.ports["gw"]),
            "--admin-port", str(self.ports["admin"]), "--workers", "2",
        ])  # fmt: skip
        auth = {"Authorization": f"Bearer {self.token}"}
        wait_for(self.stack, f"{self.api}/environments", auth)
        wait_for(self.stack, f"http://{HOST}:{self.ports['admin']}/readyz")
        wait_for(self.stack, f"{self.upstream}/")

    async def forget(self) -> None:
        """Remove every key this run wrote, and only those."""
        import redis.asyncio

        client = redis.asyncio.Redis(host=HOST, port=6379)
        async for name in client.scan_iter(match=f"{self.prefix}:*", count=1000):
            await client.delete(name)
        await client.aclose()


async def call(
    session: aiohttp.ClientSession, redis: Redis, method: str, path: str, body: Any
) -> Any:
    headers = {"Authorization": f"Bearer {redis.token}"}
    async with session.request(
        method, redis.api + path, json=body, headers=headers
    ) as response:
        payload = await response.json()
        if response.status >= 300:
            raise RuntimeError(f"{method} {path}: {response.status} {payload}")
        return payload


async def deploy(
    session: aiohttp.ClientSession, redis: Redis, agent: str, path: str, wait: bool
) -> Any:
    base = f"/projects/bench/agents/{agent}"
    await call(session, redis, "PUT", base, {"upstream_url": redis.upstream + path})
    query = "?wait=5" if wait else ""
    body = {"environment": "scale", "endpoint_auth": {"type": "none"}}
    return await call(session, redis, "POST", f"{base}/deployments{query}", body)


async def seen(session: aiohttp.ClientSession, url: str, expect: str) -> bool:
    async with session.get(url) as response:
        return response.status == 200 and await response.text() == expect


async def propagation(session: aiohttp.ClientSession, redis: Redis, count: int) -> None:
    """Deploy-to-enforcement: polled through the gateway, and via ``?wait=``."""
    await call(
        session, redis, "PUT", "/environments/scale", {"gateway_url": redis.gateway}
    )
    await call(session, redis, "PUT", "/projects/bench", {})
    await deploy(session, redis, "moving", "/v0", wait=True)
    fresh = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
    polled, waited, workers = [], [], set()
    async with fresh:
        for index in range(1, count + 1):
            started = time.perf_counter()
            await deploy(session, redis, "moving", f"/v{index}", wait=False)
            url = f"{redis.gateway}/bench/moving/"
            while not await seen(fresh, url, f"/v{index}/"):
                if time.perf_counter() - started > 5:
                    raise RuntimeError(f"deploy {index} not enforced within 5 s")
            polled.append(time.perf_counter() - started)
        for index in range(count + 1, 2 * count + 1):
            started = time.perf_counter()
            answer = await deploy(session, redis, "moving", f"/v{index}", wait=True)
            waited.append(time.perf_counter() - started)
            workers.add(
                (answer["propagation"]["live"], answer["propagation"]["applied"])
            )
    print(f"deploy call to first enforced answer (polling): {spread(polled)}")
    print(f"deploy call with ?wait= until every worker applied: {spread(waited)}")
    print(f"  (live, applied) workers seen in those answers: {sorted(workers)}")


async def sse_delays(url: str, events: int) -> list[float]:
    """Seconds from each event's send stamp to its arrival here."""
    delays = []
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        async for line in response.content:
            arrived = time.monotonic_ns()
            if line.startswith(b"data: "):
                sent = int(line.split()[2])
                delays.append((arrived - sent) / 1e9)
    if len(delays) != events:
        raise RuntimeError(f"{url}: {len(delays)} of {events} events arrived")
    return delays


async def sse_overhead(
    session: aiohttp.ClientSession, redis: Redis, streams: int
) -> None:
    """Per-event delay directly and through the gateway, streams interleaved."""
    await deploy(session, redis, "stream", "", wait=True)
    query = "/stream?events=200&interval_ms=5"
    direct: list[float] = []
    through: list[float] = []
    for _ in range(streams):
        direct += await sse_delays(redis.upstream + query, 200)
        through += await sse_delays(f"{redis.gateway}/bench/stream{query}", 200)
    print(f"SSE event delay, direct: {spread(direct)}")
    print(f"SSE event delay, through the gateway: {spread(through)}")
    added_50 = percentile(through, 50) - percentile(direct, 50)
    added_99 = percentile(through, 99) - percentile(direct, 99)
    print(
        f"  added by the gateway: p50 {added_50 * 1e3:.2f} ms, "
        f"p99 {added_99 * 1e3:.2f} ms"
    )


async def redis_figures(args: argparse.Namespace, stack: Stack) -> None:
    redis = Redis(stack)
    try:
        redis.start()
        async with aiohttp.ClientSession() as session:
            if "deploy" in args.only:
                await propagation(session, redis, args.deploys)
            if "sse" in args.only:
                await sse_overhead(session, redis, args.streams)
    finally:
        for name in ("gateways", "controlplane", "upstream"):
            if name in stack.processes:
                stack.stop(name)
        await redis.forget()


# --- main --------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--repetitions", type=int, default=2_000)
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--deploys", type=int, default=100)
    parser.add_argument("--streams", type=int, default=5)
    parser.add_argument(
        "--only",
        default="agents,cache,deploy,sse",
        help="comma-separated subset of agents, cache, deploy, sse",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args(argv)
    args.only = set(args.only.split(","))
    return args


async def run(args: argparse.Namespace, stack: Stack) -> None:
    steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("agents", lambda: large_environment(args, stack)),
        ("cache", lambda: asyncio.to_thread(token_cache_memory, args.tokens)),
    ]
    for name, step in steps:
        if name in args.only:
            await step()
    if args.only & {"deploy", "sse"}:
        await redis_figures(args, stack)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with workdir(args.keep) as root:
        stack = Stack(root)
        try:
            asyncio.run(run(args, stack))
        finally:
            stack.stop_all()


if __name__ == "__main__":
    main()
