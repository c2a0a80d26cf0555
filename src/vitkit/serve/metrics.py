"""Prometheus metrics of one app (its own registry, so two apps in one process do not collide): requests by route
and status, latency, images per forward, queue depth, errors by kind."""
from __future__ import annotations

from typing import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self, queue_depth: Callable[[], float]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("vitkit_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("vitkit_request_seconds", "request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("vitkit_batch_size", "images per model forward, by task", ["task"],
                               buckets=BATCH_BUCKETS, registry=r)
        self.errors = Counter("vitkit_errors", "refused or failed requests by kind", ["kind"], registry=r)
        self.queue = Gauge("vitkit_queue_depth", "requests waiting for the model worker", registry=r)
        self.queue.set_function(queue_depth)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
