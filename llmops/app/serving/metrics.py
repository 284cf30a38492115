"""``/metrics``: prometheus-client's counters, histograms and gauges for the server, in its own registry.

Besides requests, latency and tokens: how full each decode step's batch is
(``llmops_batch_occupancy``: sequences per step, so a batching server shows steps of several)
and how long requests wait for a sequence slot (``llmops_queue_wait_seconds``, with
``llmops_requests_queued`` now waiting).
"""

from __future__ import annotations

from typing import Any

from llmops.app.serving.engines import Job, Observer

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
OCCUPANCY_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llmops_requests", "Requests answered, by the version that answered and how",
                                ["model", "version", "endpoint", "status"], registry=r)
        self.refused = Counter("llmops_refused_requests", "Requests refused before a version took them "
                               "(bad input, authentication, a full queue)", ["endpoint", "code"], registry=r)
        self.latency = Histogram("llmops_request_latency_seconds", "Arrival to last byte",
                                 ["model", "version", "endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("llmops_time_to_first_token_seconds", "Arrival to the first generated token",
                              ["model", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("llmops_tokens", "Prompt and completion tokens", ["model", "version", "kind"], registry=r)
        self.in_flight = Gauge("llmops_requests_in_flight", "Requests admitted and not finished (running or queued)",
                               registry=r)
        self.served = Gauge("llmops_served_version", "1 for the version new requests go to",
                            ["model", "version"], registry=r)
        self.swaps = Counter("llmops_swaps", "Switches to a new version of the followed alias", ["model", "result"],
                             registry=r)
        self.occupancy = Histogram("llmops_batch_occupancy", "Sequences decoded together in one decode step",
                                   ["model", "version"], buckets=OCCUPANCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("llmops_queue_wait_seconds", "Time a request waited for a sequence slot",
                                    ["model", "version"], buckets=QUEUE_BUCKETS, registry=r)
        self.queued = Gauge("llmops_requests_queued", "Requests waiting for a sequence slot now", registry=r)
        self.parallel = Gauge("llmops_parallel_sequences", "Sequences the served version decodes at once",
                              ["model", "version"], registry=r)

    def observer(self, name: str, version: str) -> EngineObserver:
        return EngineObserver(self, name, version)

    def serving(self, name: str, version: str, previous: str | None = None) -> None:
        if previous is not None:
            self.served.labels(name, previous).set(0)
        self.served.labels(name, version).set(1)

    def answered(self, *, name: str, version: str, endpoint: str, status: str, latency_s: float | None,
                 ttft_s: float | None, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        self.requests.labels(name, version, endpoint, status).inc()
        if latency_s is not None:
            self.latency.labels(name, version, endpoint).observe(latency_s)
        if ttft_s is not None:
            self.ttft.labels(name, version).observe(ttft_s)
        if prompt_tokens:
            self.tokens.labels(name, version, "prompt").inc(prompt_tokens)
        if completion_tokens:
            self.tokens.labels(name, version, "completion").inc(completion_tokens)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def snapshot(self) -> dict[str, Any]:
        return {m.name: {"|".join(s.labels.values()): s.value for s in m.samples} for m in self.registry.collect()}


class EngineObserver(Observer):
    """An engine's decode steps and slot waits, as this server's metrics (called on its thread)."""

    def __init__(self, metrics: Metrics, name: str, version: str) -> None:
        self._occupancy = metrics.occupancy.labels(name, version)
        self._wait = metrics.queue_wait.labels(name, version)

    def step(self, sequences: int) -> None:
        self._occupancy.observe(sequences)

    def started(self, job: Job) -> None:
        out = job.out
        if out.queued_at is not None and out.started_at is not None:
            self._wait.observe(max(0.0, out.started_at - out.queued_at))
