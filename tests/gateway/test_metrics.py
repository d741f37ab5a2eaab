"""Route metrics: tallied in the worker, handed to Prometheus by flush()."""

from __future__ import annotations

from prometheus_client import REGISTRY

from gateway.metrics import RouteMetrics, flush

LATENCY = "agw_gateway_upstream_latency_seconds"
REQUESTS = "agw_gateway_requests_total"


def _sample(name: str, project: str, agent: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(
        name, {"project": project, "agent": agent, **labels}
    )


def test_route_metrics_creates_no_series_until_used() -> None:
    RouteMetrics.of("metrics-idle", "agent")
    flush()

    assert _sample(f"{LATENCY}_count", "metrics-idle", "agent") is None
    assert _sample(REQUESTS, "metrics-idle", "agent") is None


def test_route_metrics_count_only_once_flushed() -> None:
    metrics = RouteMetrics.of("metrics-flush", "agent")
    metrics.answered(200)
    metrics.latency.observe(0.02)

    assert _sample(REQUESTS, "metrics-flush", "agent", status="200") == 0.0
    assert _sample(f"{LATENCY}_count", "metrics-flush", "agent") == 0.0
    flush()
    assert _sample(REQUESTS, "metrics-flush", "agent", status="200") == 1.0
    assert _sample(f"{LATENCY}_count", "metrics-flush", "agent") == 1.0
    flush()
    assert _sample(REQUESTS, "metrics-flush", "agent", status="200") == 1.0


def test_route_metrics_counts_latency_and_status_as_prometheus_would() -> None:
    metrics = RouteMetrics.of("metrics-used", "agent")

    for seconds in (0.02, 0.025, 0.3, 61.0):
        metrics.latency.observe(seconds)
    metrics.answered(200)
    metrics.answered(200)
    metrics.answered(502)
    flush()

    def bucket(le: str) -> float | None:
        return _sample(f"{LATENCY}_bucket", "metrics-used", "agent", le=le)

    assert _sample(f"{LATENCY}_count", "metrics-used", "agent") == 4.0
    assert (bucket("0.01"), bucket("0.025"), bucket("0.5")) == (0.0, 2.0, 3.0)
    assert (bucket("60.0"), bucket("+Inf")) == (3.0, 4.0)
    assert _sample(f"{LATENCY}_sum", "metrics-used", "agent") == 61.345
    assert _sample(REQUESTS, "metrics-used", "agent", status="200") == 2.0
    assert _sample(REQUESTS, "metrics-used", "agent", status="502") == 1.0


def test_route_metrics_are_one_per_agent_across_redeploys() -> None:
    first = RouteMetrics.of("metrics-same", "agent")

    assert RouteMetrics.of("metrics-same", "agent") is first
    assert RouteMetrics.of("metrics-same", "other") is not first
    assert first.latency is first.latency
