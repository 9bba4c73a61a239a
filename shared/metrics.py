"""Prometheus metrics of both daemons (prometheus-client), each app with its own registry.

The families are pinned in DESIGN.md ("Operations"): the ingress's
``lukewarm_requests_total{customer,model,status}`` and
``lukewarm_request_duration_seconds{start}``; the proxy's ``lukewarm_replicas{state}``,
``lukewarm_starts_total{tier}``, ``lukewarm_start_duration_seconds{tier,phase}`` and
``lukewarm_gpu_memory_used_bytes{gpu}``; more below. Counters and histograms are updated where
things happen; gauges of state (replicas, in flight, queues, GPUs) are set from the daemon's own
snapshot when ``/metrics`` is scraped, so they never drift from what the heartbeat says.

A registry per app, not prometheus-client's global one: tests and ``lukewarm dev`` run several
apps in one process. Label values are bounded: customer and model names are validated names,
statuses and tiers come from small fixed sets.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from shared.messages import START_PHASES

# Request latency: a warm call takes milliseconds, a cold start seconds, a big batch minutes.
REQUEST_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# Start phases: an unpause is milliseconds, a pull minutes.
START_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0, 600.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class IngressMetrics:
    """What an ingress counts: requests by customer, model and status; latency by start tier."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("lukewarm_requests", "Inference requests answered, by status.",
                                ("customer", "model", "status"), registry=self.registry)
        self.duration = Histogram("lukewarm_request_duration_seconds",
                                  "Inference request latency, by what the request met (warm, lukewarm, cold).",
                                  ("start",), buckets=REQUEST_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("lukewarm_requests_in_flight", "Inference requests being answered now.",
                               registry=self.registry)
        self.pending = Gauge("lukewarm_pending_requests", "Requests running or held at this ingress, per version.",
                             ("version",), registry=self.registry)
        self.proxies = Gauge("lukewarm_proxies", "Runtime proxies in this ingress's view.", registry=self.registry)
        self.redis_ok = Gauge("lukewarm_redis_up", "1 while this ingress's last Redis poll succeeded.",
                              registry=self.registry)
        self.hedges = Gauge("lukewarm_hedges", "Chunks hedged on a second proxy since start.", registry=self.registry)

    def request(self, customer: str, model: str, status: int) -> None:
        self.requests.labels(customer, model, str(status)).inc()

    def answered(self, seconds: float, start: str) -> None:
        self.duration.labels(start or "warm").observe(seconds)

    def render(self, pending: Mapping[str, int], proxies: int, redis_ok: bool, hedges: int) -> bytes:
        _set_all(self.pending, pending)
        self.proxies.set(proxies)
        self.redis_ok.set(1 if redis_ok else 0)
        self.hedges.set(hedges)
        return generate_latest(self.registry)


class ProxyMetrics:
    """What a proxy counts: chunks, starts by tier and phase; replicas, queues and GPUs at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.chunks = Counter("lukewarm_chunks", "Chunks answered by this proxy, by status.", ("status",),
                              registry=self.registry)
        self.copies = Counter("lukewarm_chunk_copies", "Copies of a chunk answered without running it again.",
                              ("kind",), registry=self.registry)
        self.starts = Counter("lukewarm_starts", "Chunks that met a replica start, by tier (lukewarm, cold).",
                              ("tier",), registry=self.registry)
        self.start_duration = Histogram("lukewarm_start_duration_seconds", "Replica start phases, by tier.",
                                        ("tier", "phase"), buckets=START_BUCKETS, registry=self.registry)
        self.replicas = Gauge("lukewarm_replicas", "Replicas on this host, by state.", ("state",),
                              registry=self.registry)
        self.in_flight = Gauge("lukewarm_chunks_in_flight", "Chunks running on this host's replicas.",
                               registry=self.registry)
        self.waiting = Gauge("lukewarm_chunks_waiting", "Chunks waiting for a replica slot (queue depth).",
                             registry=self.registry)
        self.gpu_memory = Gauge("lukewarm_gpu_memory_used_bytes", "GPU memory in use (NVML), per GPU.", ("gpu",),
                                registry=self.registry)
        self.gpu_total = Gauge("lukewarm_gpu_memory_total_bytes", "GPU memory (NVML), per GPU.", ("gpu",),
                               registry=self.registry)
        self.gpu_util = Gauge("lukewarm_gpu_utilization_ratio", "GPU utilisation (NVML, 0–1), per GPU.", ("gpu",),
                              registry=self.registry)

    def chunk(self, status: int, start: str = "", timings: Mapping[str, float] | None = None) -> None:
        self.chunks.labels(str(status)).inc()
        if start in ("lukewarm", "cold"):
            self.starts.labels(start).inc()
            for name, ms in (timings or {}).items():
                phase = name.removesuffix("_ms")
                if name.endswith("_ms") and phase in START_PHASE_NAMES:
                    self.start_duration.labels(start, phase).observe(ms / 1000)

    def render(self, replicas: Iterable[Mapping[str, Any]], waiting: Mapping[str, int],
               gpus: Iterable[Mapping[str, Any]]) -> bytes:
        states: dict[str, int] = dict.fromkeys(("starting", "running", "paused", "stopped"), 0)
        in_flight = 0
        for replica in replicas:
            states[str(replica.get("state"))] = states.get(str(replica.get("state")), 0) + 1
            in_flight += int(replica.get("in_flight") or 0)
        _set_all(self.replicas, states)
        self.in_flight.set(in_flight)
        self.waiting.set(sum(waiting.values()))
        for gpu in gpus:
            uuid = str(gpu.get("uuid") or gpu.get("gpu_uuid") or "")
            if not uuid:
                continue
            self.gpu_memory.labels(uuid).set(float(gpu.get("memory_used_mb") or 0) * 2**20)
            self.gpu_total.labels(uuid).set(float(gpu.get("memory_total_mb") or 0) * 2**20)
            if gpu.get("utilization_pct") is not None:
                self.gpu_util.labels(uuid).set(float(gpu["utilization_pct"]) / 100)
        return generate_latest(self.registry)


# The start phases the heartbeat and Server-Timing know (shared.messages), plus a GPU swap's wait and the queue.
START_PHASE_NAMES = frozenset(START_PHASES) | {"gpu", "queue"}


def _set_all(gauge: Gauge, values: Mapping[str, int | float]) -> None:
    """Set a one-label gauge to exactly ``values``: children no longer present are removed."""
    gauge.clear()
    for label, value in values.items():
        gauge.labels(label).set(value)
