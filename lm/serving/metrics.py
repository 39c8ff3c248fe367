"""What ``GET /metrics`` shows, in Prometheus' text format (prometheus-client), one registry per app
so that several servers in one process (tests) keep their own counts."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds: from a cached greedy token (~1 ms) to a long answer under load.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "lmforge_requests", "HTTP requests by route and status, and the model version that was served",
            ["route", "status", "version"], registry=r,
        )
        self.latency = Histogram(
            "lmforge_request_seconds", "Time from a request's arrival to the end of its response (streams: the last event)",
            ["route"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.first_token = Histogram(
            "lmforge_time_to_first_token_seconds", "Time from a generation request's arrival to its first token",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "Prompt tokens read", ["version"], registry=r)
        self.generated_tokens = Counter("lmforge_generated_tokens", "Tokens generated", ["version"], registry=r)
        self.batch_size = Histogram(
            "lmforge_batch_size", "Rows decoded together per step (a classifier: texts per forward pass)",
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge("lmforge_queue_depth", "Requests waiting to join the running batch", registry=r)
        self.running = Gauge("lmforge_running_batch_size", "Rows in the running batch now", registry=r)
        self.in_flight = Gauge("lmforge_requests_in_flight", "Requests being served now (the --max-concurrent limit)", registry=r)
        self.model_info = Gauge(
            "lmforge_model_info", "1 for the model version that new requests go to", ["model", "version", "source"],
            registry=r,
        )
        self.swaps = Counter("lmforge_model_swaps", "Times a new registry version replaced the served one", registry=r)
        self.load_failures = Counter(
            "lmforge_model_load_failures", "New registry versions that failed to load (the old one kept serving)",
            registry=r,
        )

    def watch_engines(self, queue_depth: Callable[[], float], running: Callable[[], float]) -> None:
        """Read the engines' queue and batch when scraped."""
        self.queue_depth.set_function(queue_depth)
        self.running.set_function(running)

    def serving(self, model: str, version: str, source: str, before: tuple[str, str, str] | None = None) -> None:
        """The model version new requests go to (replacing ``before``'s labels)."""
        if before is not None:
            self.model_info.remove(*before)
        self.model_info.labels(model, version, source).set(1)

    def step(self, version: str, rows: int, generated: bool) -> None:
        """One step of an engine: ``rows`` decoded together (each made one token if ``generated``)."""
        self.batch_size.observe(rows)
        if generated:
            self.generated_tokens.labels(version).inc(rows)
