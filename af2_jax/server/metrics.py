"""The server's Prometheus metrics (`GET /metrics`), in a registry of its own (two servers in one process, as in
tests, never share counters)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# How a chat-completion request ended: a finish reason, or why it got no answer.
OUTCOMES = ("stop", "length", "invalid", "rejected", "timeout", "cancelled", "error")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600)


class ServerMetrics:
    """The counters, gauges (read from the engine at each scrape) and histograms of one server."""

    CONTENT_TYPE = CONTENT_TYPE_LATEST

    def __init__(self, waiting: Callable[[], int], busy: Callable[[], int]):
        self.registry = CollectorRegistry()
        self.requests = Counter("af2_requests", "Chat-completion requests by how they ended", ["outcome"],
                                registry=self.registry)
        for outcome in OUTCOMES:  # every outcome shows from the start, at 0
            self.requests.labels(outcome)
        self.tokens = Counter("af2_generated_tokens", "Tokens generated", registry=self.registry)
        Gauge("af2_queue_depth", "Requests waiting for a slot", registry=self.registry).set_function(waiting)
        Gauge("af2_busy_slots", "Slots holding a request", registry=self.registry).set_function(busy)
        self.latency = Histogram("af2_request_latency_seconds", "Arrival to last token of answered requests",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.first_token = Histogram("af2_time_to_first_token_seconds", "Arrival to the first token",
                                     buckets=LATENCY_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
