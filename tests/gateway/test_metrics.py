"""Route metrics: label children appear with the first request, not before."""

from __future__ import annotations

from prometheus_client import REGISTRY

from gateway.metrics import RouteMetrics


def _sample(name: str, project: str, agent: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(
        name, {"project": project, "agent": agent, **labels}
    )


def test_route_metrics_creates_no_series_until_used() -> None:
    RouteMetrics("metrics-idle", "agent")

    count = "agw_gateway_upstream_latency_seconds_count"
    assert _sample(count, "metrics-idle", "agent") is None
    assert _sample("agw_gateway_requests_total", "metrics-idle", "agent") is None


def test_route_metrics_counts_latency_and_status_once_used() -> None:
    metrics = RouteMetrics("metrics-used", "agent")

    metrics.latency.observe(0.02)
    metrics.latency.observe(0.3)
    metrics.answered(200)
    metrics.answered(200)
    metrics.answered(502)

    name = "agw_gateway_upstream_latency_seconds"
    assert _sample(f"{name}_count", "metrics-used", "agent") == 2.0
    assert _sample(f"{name}_bucket", "metrics-used", "agent", le="0.025") == 1.0
    assert _sample(f"{name}_sum", "metrics-used", "agent") == 0.32
    requests = "agw_gateway_requests_total"
    assert _sample(requests, "metrics-used", "agent", status="200") == 2.0
    assert _sample(requests, "metrics-used", "agent", status="502") == 1.0
    assert metrics.latency is metrics.latency
