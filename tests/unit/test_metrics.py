"""shared/metrics.py: the pinned families, parsed back with prometheus-client's own parser."""
from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from shared.metrics import IngressMetrics, ProxyMetrics


def parsed(text: bytes) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text.decode())}


def samples(family: Any, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == name}


def test_ingress_families_types_and_values() -> None:
    m = IngressMetrics()
    m.request("acme", "churn", 200)
    m.request("acme", "churn", 200)
    m.request("", "", 401)
    m.answered(0.004, "warm")
    m.answered(3.0, "cold")
    families = parsed(m.render({"acme/churn/main/1": 2}, proxies=3, redis_ok=True, hedges=1))
    assert families["lukewarm_requests"].type == "counter"
    assert samples(families["lukewarm_requests"], "lukewarm_requests_total") == {
        (("customer", "acme"), ("model", "churn"), ("status", "200")): 2.0,
        (("customer", ""), ("model", ""), ("status", "401")): 1.0}
    duration = families["lukewarm_request_duration_seconds"]
    assert duration.type == "histogram"
    counts = samples(duration, "lukewarm_request_duration_seconds_count")
    assert counts == {(("start", "warm"),): 1.0, (("start", "cold"),): 1.0}
    buckets = {(s.labels["start"], s.labels["le"]): s.value for s in duration.samples if s.name.endswith("_bucket")}
    assert buckets[("warm", "0.005")] == 1.0 and buckets[("cold", "2.5")] == 0.0 and buckets[("cold", "5.0")] == 1.0
    assert samples(families["lukewarm_pending_requests"], "lukewarm_pending_requests") == {
        (("version", "acme/churn/main/1"),): 2.0}
    assert families["lukewarm_proxies"].samples[0].value == 3.0
    assert families["lukewarm_redis_up"].samples[0].value == 1.0


def test_a_version_no_longer_pending_leaves_the_gauge() -> None:
    m = IngressMetrics()
    m.render({"a/m/main/1": 1}, 0, True, 0)
    families = parsed(m.render({}, 0, True, 0))
    assert samples(families["lukewarm_pending_requests"], "lukewarm_pending_requests") == {}


def test_proxy_families_from_chunks_and_state() -> None:
    m = ProxyMetrics()
    m.chunk(200, "warm", {"infer_ms": 1.0})
    m.chunk(200, "cold", {"create_ms": 20.0, "start_ms": 300.0, "ready_ms": 900.0, "infer_ms": 2.0})
    m.chunk(200, "lukewarm", {"unpause_ms": 3.0})
    m.chunk(502)
    replicas = [{"state": "running", "in_flight": 2}, {"state": "paused", "in_flight": 0},
                {"state": "running", "in_flight": 0}]
    gpus = [{"uuid": "GPU-1", "memory_used_mb": 1024, "memory_total_mb": 81920, "utilization_pct": 50}]
    families = parsed(m.render(replicas, {"a/m/main/1": 3}, gpus))
    assert samples(families["lukewarm_starts"], "lukewarm_starts_total") == {
        (("tier", "cold"),): 1.0, (("tier", "lukewarm"),): 1.0}
    phases = samples(families["lukewarm_start_duration_seconds"], "lukewarm_start_duration_seconds_count")
    assert phases == {(("phase", p), ("tier", "cold")): 1.0 for p in ("create", "start", "ready")} | {
        (("phase", "unpause"), ("tier", "lukewarm")): 1.0}
    assert samples(families["lukewarm_replicas"], "lukewarm_replicas") == {
        (("state", "running"),): 2.0, (("state", "paused"),): 1.0, (("state", "starting"),): 0.0,
        (("state", "stopped"),): 0.0}
    assert families["lukewarm_chunks_in_flight"].samples[0].value == 2.0
    assert families["lukewarm_chunks_waiting"].samples[0].value == 3.0
    assert samples(families["lukewarm_chunks"], "lukewarm_chunks_total") == {
        (("status", "200"),): 3.0, (("status", "502"),): 1.0}
    assert samples(families["lukewarm_gpu_memory_used_bytes"], "lukewarm_gpu_memory_used_bytes") == {
        (("gpu", "GPU-1"),): 1024 * 2**20}
    assert families["lukewarm_gpu_utilization_ratio"].samples[0].value == 0.5
