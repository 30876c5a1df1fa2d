"""Prometheus metrics shared by the three services; `service` is a label on each."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RPC_REQUESTS = Counter("relevans_rpc_requests_total", "gRPC calls handled", ["service", "method", "code"])
RPC_LATENCY = Histogram(
    "relevans_rpc_duration_seconds",
    "gRPC call latency",
    ["service", "method"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
CONSUMER_LAG = Gauge("relevans_consumer_lag_messages", "Messages not yet delivered", ["service", "consumer"])
CONSUMER_HANDLED = Counter(
    "relevans_consumer_messages_total", "Bus messages handled", ["service", "consumer", "outcome"]
)
OUTBOX_BACKLOG = Gauge("relevans_outbox_backlog", "Outbox rows not yet published", ["service"])
OUTBOX_PUBLISHED = Counter("relevans_outbox_published_total", "Outbox rows published", ["service"])
MESSAGES_BY_STATUS = Counter("relevans_messages_total", "Delivery messages by status", ["status", "channel"])
DELIVERY_OUTCOME_WRITE_RETRIES = Counter(
    "relevans_delivery_outcome_write_retries_total",
    "Writes of send claims and outcomes that failed and are retried",
)

_started: set[int] = set()


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Expose /metrics on `port` once per process (0 disables)."""
    if port and port not in _started:
        start_http_server(port, addr=host)
        _started.add(port)
