"""Committing a change that gateways enforce, with its revision known in advance.

Policies and records carry the revision that wrote them, but the store assigns
a revision only when it commits. Every control-plane commit to an environment
therefore also writes ``revisions/{env}`` and expects it unchanged since it was
read: the commit then gets exactly the next revision, and any other change to
the environment in between (a concurrent deploy, an IdP removal) makes it
conflict, re-read and plan again. Each change is thus planned against the
state it is applied to.

Every module that commits to an environment must go through :func:`commit`.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from controlplane.errors import Conflict
from gateway.log import controlplane_log
from gateway.store import Store, StoreConflict

__all__ = ["Plan", "commit", "revision_record"]

T = TypeVar("T")

_ATTEMPTS = 50


@dataclass(frozen=True)
class Plan(Generic[T]):
    """What one change writes (``None`` deletes) and what the caller answers."""

    result: T
    records: Mapping[str, bytes | None] = field(default_factory=dict)
    policies: Mapping[str, bytes | None] = field(default_factory=dict)


Planner = Callable[[int], Awaitable[Plan[T]]]


def revision_record(env: str) -> str:
    return f"revisions/{env}"


async def commit(store: Store, env: str, planner: Planner[T]) -> tuple[int, T]:
    """Plan the change for the next revision and commit it; retry on a race.

    ``planner`` does its reads and checks itself, so a retry re-checks them.
    """
    for _ in range(_ATTEMPTS):
        outcome = await _attempt(store, env, planner)
        if outcome is not None:
            return outcome
        # Spread retries so that racing writers do not collide again in step.
        await asyncio.sleep(random.uniform(0.001, 0.01))

    raise Conflict(
        "concurrent_change", f"Environment {env!r} is changing too fast; retry"
    )


async def _attempt(store: Store, env: str, planner: Planner[T]) -> tuple[int, T] | None:
    key = revision_record(env)
    seen = await store.get(key)
    current = int(seen) if seen is not None else await store.revision(env)
    plan = await planner(current + 1)

    records = {**plan.records, key: str(current + 1).encode()}
    try:
        revision = await store.commit(
            env, records=records, policies=plan.policies, expect={key: seen}
        )
    except StoreConflict:
        return None

    if revision != current + 1:
        # Only a writer that bypasses this module can cause this.
        controlplane_log.warning(
            "environment %s committed revision %d, planned %d",
            env, revision, current + 1,
        )  # fmt: skip
    return revision, plan.result
