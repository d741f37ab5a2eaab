"""How far a revision has reached an environment's live gateway workers."""

from __future__ import annotations

import asyncio
from typing import Annotated

import msgspec

from controlplane.models import Propagation
from controlplane.routing import QueryParam
from gateway.store import Store

__all__ = ["WAIT", "propagation", "wait_for"]

#: How often ``?wait=`` looks at the workers' heartbeats again: soon at first,
#: since workers usually apply a change within a few milliseconds, then less
#: often, so that a long wait costs the store little.
_FIRST_POLL_S = 0.001
_MAX_POLL_S = 0.02

WAIT = QueryParam(
    "wait",
    Annotated[float, msgspec.Meta(ge=0, le=30)],
    "Seconds (at most 30) to wait until every live gateway worker has applied "
    "the revision; the answer's propagation says how far it got.",
)


async def propagation(store: Store, env: str, revision: int) -> Propagation:
    workers = await store.workers(env)
    pending = [w.id for w in workers if w.revision < revision]
    return Propagation(
        revision=revision,
        live=len(workers),
        applied=len(workers) - len(pending),
        pending=pending,
    )


async def wait_for(store: Store, env: str, revision: int, wait_s: float) -> Propagation:
    """Propagation of ``revision`` once complete, or as it is after ``wait_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    poll_s = _FIRST_POLL_S
    while True:
        state = await propagation(store, env, revision)
        if not state.pending or loop.time() >= deadline:
            return state
        await asyncio.sleep(min(poll_s, max(0.0, deadline - loop.time())))
        poll_s = min(poll_s * 2, _MAX_POLL_S)
