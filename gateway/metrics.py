"""Prometheus metrics of the gateway workers.

Workers run in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set by the
supervisor before it starts them); the supervisor's management port
aggregates every worker's files. The hot path only touches label children
cached on its route, so a request never builds a label string.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "JWKS_FETCHES",
    "OAUTH_REQUESTS",
    "POLICY_CHANGES",
    "POLICY_REVISION",
    "REQUESTS",
    "STORE_UP",
    "TOKEN_CACHE",
    "UPSTREAM_LATENCY",
    "RouteMetrics",
    "UNROUTED",
]

REQUESTS = Counter(
    "agw_gateway_requests",
    "Requests answered, by agent and status code.",
    ["project", "agent", "status"],
)

UPSTREAM_LATENCY = Histogram(
    "agw_gateway_upstream_latency_seconds",
    "Time from sending a request upstream to its response headers.",
    ["project", "agent"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
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


class RouteMetrics:
    """Label children of one route, created on first use and then reused.

    Creating them lazily matters: in multiprocess mode each child is a set of
    entries in a memory-mapped file (a histogram has one per bucket), so
    building them for every route up front cost about 10 KB per agent and
    most of the load time of a 10,000-agent environment, for agents that may
    never see a request on this worker.
    """

    __slots__ = ("_agent", "_by_status", "_latency", "_project")

    def __init__(self, project: str, agent: str) -> None:
        self._project = project
        self._agent = agent
        self._by_status: dict[int, Counter] = {}
        self._latency: Histogram | None = None

    @property
    def latency(self) -> Histogram:
        """The upstream-latency child of this route."""
        child = self._latency
        if child is None:
            child = self._latency = UPSTREAM_LATENCY.labels(self._project, self._agent)
        return child

    def answered(self, status: int) -> None:
        child = self._by_status.get(status)
        if child is None:
            child = REQUESTS.labels(self._project, self._agent, str(status))
            self._by_status[status] = child
        child.inc()


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
