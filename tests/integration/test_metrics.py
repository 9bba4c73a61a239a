"""Both daemons' /metrics, parsed by prometheus-client: the pinned families present, and moving with traffic."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.faults.test_proxy_restart import MODELS
from tests.support.stack import Stack, running_stack

pytestmark = [pytest.mark.timeout(120)]

INGRESS_FAMILIES = {"lukewarm_requests", "lukewarm_request_duration_seconds", "lukewarm_requests_in_flight",
                    "lukewarm_pending_requests", "lukewarm_proxies", "lukewarm_redis_up"}
PROXY_FAMILIES = {"lukewarm_replicas", "lukewarm_starts", "lukewarm_start_duration_seconds",
                  "lukewarm_gpu_memory_used_bytes", "lukewarm_chunks", "lukewarm_chunks_waiting"}


async def scrape(url: str) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """``/metrics`` of ``url`` (no credentials) as family → {(sample name, labels): value}."""
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
    return {f.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in f.samples}
            for f in text_string_to_metric_families(text)}


def value(families: dict[str, Any], family: str, sample: str, **labels: str) -> float:
    return float(families[family].get((sample, tuple(sorted(labels.items()))), 0.0))


async def test_both_daemons_metrics_are_present_and_move(redis_url: str, state_dir: Path) -> None:
    async with running_stack(redis_url, state_dir, "process") as stack:
        stack: Stack  # type: ignore[no-redef]
        proxy = stack.proxies[0]
        before_ingress, before_proxy = await scrape(stack.url), await scrape(proxy.url)
        assert INGRESS_FAMILIES <= set(before_ingress) and PROXY_FAMILIES <= set(before_proxy)

        await stack.customer("acme")
        await stack.deploy("echo", MODELS, "models:echo")
        for n in range(5):
            assert (await stack.call("echo", n))[0] == 200
        assert (await stack.call("nope", 1))[0] == 404

        ingress, proxied = await scrape(stack.url), await scrape(proxy.url)
        assert value(ingress, "lukewarm_requests", "lukewarm_requests_total",
                     customer="acme", model="echo", status="200") == 5
        # A request whose model does not exist is counted without minting a series for its name.
        assert value(ingress, "lukewarm_requests", "lukewarm_requests_total", customer="", model="", status="404") == 1
        assert sum(v for (name, _), v in ingress["lukewarm_request_duration_seconds"].items()
                   if name.endswith("_count")) == 5
        assert value(ingress, "lukewarm_proxies", "lukewarm_proxies") == 1
        assert value(proxied, "lukewarm_starts", "lukewarm_starts_total", tier="cold") == 1
        assert value(proxied, "lukewarm_start_duration_seconds", "lukewarm_start_duration_seconds_count",
                     tier="cold", phase="ready") == 1
        assert value(proxied, "lukewarm_chunks", "lukewarm_chunks_total", status="200") == 5
        assert value(proxied, "lukewarm_replicas", "lukewarm_replicas", state="running") == 1
