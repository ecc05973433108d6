"""Prometheus metrics of one app (its own registry, so several apps in one process stay apart)."""
from __future__ import annotations

from typing import Any, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PATHS = frozenset({"/", "/health", "/ready", "/metrics", "/v1/classify", "/v1/pipeline", "/docs", "/openapi.json"})


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("hierarchy_http_requests", "HTTP requests by path and status code",
                                ["path", "code"], registry=r)
        self.items = Counter("hierarchy_items", "classified items by record status", ["status"], registry=r)
        self.item_errors = Counter("hierarchy_item_errors", "items with an error record, by error type",
                                   ["type"], registry=r)
        self.latency = Histogram("hierarchy_classify_seconds", "POST /v1/classify latency, body read to response",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("hierarchy_batch_items", "items per router call (requests batched together)",
                               buckets=BATCH_BUCKETS, registry=r)
        self.busy = Counter("hierarchy_busy_rejections", "classify requests refused with 503: queue full", registry=r)
        self.in_flight = Gauge("hierarchy_classify_in_flight", "classify requests admitted and not yet answered",
                               registry=r)

    def request(self, path: str, code: int) -> None:
        label = "/static" if path.startswith("/static/") else path if path in PATHS else "other"
        self.requests.labels(label, str(code)).inc()

    def records(self, records: Iterable[dict[str, Any]]) -> None:
        for rec in records:
            self.items.labels(rec["status"]).inc()
            if rec["status"] == "error":
                self.item_errors.labels(rec["error"]["type"]).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
