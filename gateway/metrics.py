"""Prometheus metrics of the gateway workers.

Workers run in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set by the
supervisor before it starts them); the supervisor's management port
aggregates every worker's files.

In that mode every increment takes a lock and writes a memory-mapped file,
about 2 µs, several times a request. The hot path therefore counts in
:class:`Tally` and :class:`LatencyTally`, plain attributes of the process,
and :func:`flush` adds what they hold to the Prometheus values; a worker
flushes every :data:`FLUSH_INTERVAL_S` and when it stops, so a scrape sees
each request within that interval.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "FLUSH_INTERVAL_S",
    "JWKS_FETCHES",
    "LatencyTally",
    "OAUTH_REQUESTS",
    "POLICY_CHANGES",
    "POLICY_REVISION",
    "REQUESTS",
    "STORE_UP",
    "TOKEN_CACHE",
    "UPSTREAM_LATENCY",
    "RouteMetrics",
    "Tally",
    "UNROUTED",
    "flush",
]

#: Longest time a request's counts wait in the worker before a scrape sees them.
FLUSH_INTERVAL_S = 1.0

REQUESTS = Counter(
    "agw_gateway_requests",
    "Requests answered, by agent and status code.",
    ["project", "agent", "status"],
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

UPSTREAM_LATENCY = Histogram(
    "agw_gateway_upstream_latency_seconds",
    "Time from sending a request upstream to its response headers.",
    ["project", "agent"],
    buckets=_LATENCY_BUCKETS,
)

POLICY_REVISION = Gauge(
    "agw_gateway_policy_revision",
    "The environment revision each worker has applied.",
    multiprocess_mode="liveall",
)

POLICY_CHANGES = Counter(
    "agw_gateway_policy_changes",
    "Policy changes applied (one per revision).",
)

STORE_UP = Gauge(
    "agw_gateway_store_up",
    "1 while the worker follows the store's change log, 0 while it cannot.",
    multiprocess_mode="liveall",
)


_TALLIES: list[Tally | LatencyTally] = []


class Tally:
    """Increments of one counter child, handed on by :func:`flush`."""

    __slots__ = ("_child", "count")

    def __init__(self, child: Counter) -> None:
        self._child = child
        self.count = 0
        _TALLIES.append(self)

    def inc(self) -> None:
        self.count += 1

    def flush(self) -> None:
        count = self.count
        if count:
            self.count = 0
            self._child.inc(count)


class LatencyTally:
    """Observations of one histogram child, handed on by :func:`flush`.

    prometheus_client has no call that adds many observations at once, so
    the flush adds to the child's bucket and sum values directly; the
    metrics tests read them back through the management port.
    """

    __slots__ = ("_child", "_counts", "_sum")

    _BOUNDS = (*_LATENCY_BUCKETS, float("inf"))

    def __init__(self, child: Histogram) -> None:
        self._child = child
        self._counts = [0] * len(self._BOUNDS)
        self._sum = 0.0
        _TALLIES.append(self)

    def observe(self, seconds: float) -> None:
        # The first bucket whose bound is >= seconds, as Histogram.observe.
        self._counts[bisect_left(self._BOUNDS, seconds)] += 1
        self._sum += seconds

    def flush(self) -> None:
        counts = self._counts
        if not any(counts):
            return
        child: object = self._child
        for index, count in enumerate(counts):
            if count:
                child._buckets[index].inc(count)  # type: ignore[attr-defined]
                counts[index] = 0
        child._sum.inc(self._sum)  # type: ignore[attr-defined]
        self._sum = 0.0


def flush() -> None:
    """Add every tally to its Prometheus value (cheap when nothing changed)."""
    for tally in _TALLIES:
        tally.flush()


class RouteMetrics:
    """Tallies of one agent, shared by every route that serves it.

    One per (project, agent) for the life of the worker: a redeploy builds a
    new route but keeps counting in the same tallies. Their Prometheus
    children are created on first use: in multiprocess mode each is a set
    of entries in a memory-mapped file (a histogram has one per bucket), so
    building them up front for 10,000 agents that may never see a request
    on this worker cost most of the load time.
    """

    __slots__ = ("_agent", "_by_status", "_latency", "_project")

    _known: dict[tuple[str, str], RouteMetrics] = {}

    def __init__(self, project: str, agent: str) -> None:
        self._project = project
        self._agent = agent
        self._by_status: dict[int, Tally] = {}
        self._latency: LatencyTally | None = None

    @classmethod
    def of(cls, project: str, agent: str) -> RouteMetrics:
        """The metrics of an agent, made on first use."""
        metrics = cls._known.get((project, agent))
        if metrics is None:
            metrics = cls._known[(project, agent)] = cls(project, agent)
        return metrics

    @property
    def latency(self) -> LatencyTally:
        """The upstream-latency tally of this agent."""
        tally = self._latency
        if tally is None:
            child = UPSTREAM_LATENCY.labels(self._project, self._agent)
            tally = self._latency = LatencyTally(child)
        return tally

    def answered(self, status: int) -> None:
        tally = self._by_status.get(status)
        if tally is None:
            child = REQUESTS.labels(self._project, self._agent, str(status))
            tally = self._by_status[status] = Tally(child)
        tally.count += 1


#: Requests that matched no deployed agent.
UNROUTED = RouteMetrics("", "")

# --- OAuth endpoint authentication (gateway/oauth.py, gateway/jwks.py) --------

OAUTH_REQUESTS = Counter(
    "agw_oauth_requests",
    "OAuth-protected requests by outcome and, when denied, the failed check.",
    ["outcome", "reason"],
)

JWKS_FETCHES = Counter(
    "agw_jwks_fetches",
    "JWK set fetches by identity provider and result.",
    ["identity_provider", "result"],
)

TOKEN_CACHE = Counter(
    "agw_token_cache",
    "Verified-token cache lookups by result.",
    ["result"],
)
