"""Faults in replicas, with real containers: one killed mid-request; requests racing a pause and an eviction.
Every call is answered, 200 or a clear error; the next call after a kill is served again."""
from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from loadtests.traffic import Traffic
from tests.support.stack import Stack, running_stack, wait_until

pytestmark = [pytest.mark.timeout(240)]


def container_ids(proxy_id: str, model: str) -> list[str]:
    return subprocess.run(["docker", "ps", "-q", "--filter", f"label=lukewarm.proxy={proxy_id}",
                           "--filter", f"label=lukewarm.model={model}"],
                          capture_output=True, text=True, timeout=30).stdout.split()


def traffic(stack: Stack, model: str, rate_per_s: float, callers: int = 2) -> Traffic:
    return Traffic([stack.url], stack.call_headers(), f"/v1/{model}/latest",
                   lambda n: {"data": n, "timeout_seconds": 30}, callers=callers, timeout_s=40, rate_per_s=rate_per_s,
                   expected=lambda n, body: body == {"data": {"echo": n}})


async def test_a_container_killed_mid_request(redis_url: str, state_dir: Path, model_image: str) -> None:
    async with running_stack(redis_url, state_dir, "docker") as stack:
        await stack.customer("acme")
        await stack.deploy("slow", model_image, "models:slow")
        await stack.deploy("echo", model_image, "models:echo")
        assert (await stack.call("slow", 0))[0] == 200
        pid = stack.proxies[0].proxy_id
        [victim] = container_ids(pid, "slow")
        async with traffic(stack, "echo", rate_per_s=20) as other:  # another model, unharmed throughout
            call = asyncio.ensure_future(stack.call("slow", 20, extra={"timeout_seconds": 60}, timeout_s=90))

            async def in_flight() -> bool:
                replicas = (await stack.proxies[0].state(stack.session))["replicas"]
                return any(r["in_flight"] for r in replicas)  # type: ignore[union-attr]

            await wait_until(in_flight, 30, "the slow call to reach its replica")
            subprocess.run(["docker", "kill", victim], capture_output=True, timeout=30, check=True)
            status, body, _ = await asyncio.wait_for(call, 60)
            assert status == 502 and isinstance(body.get("error"), str), body
            # The next call starts a new replica and is served.
            status, body, _ = await stack.call("slow", 0, extra={"timeout_seconds": 60}, timeout_s=90)
            assert (status, body) == (200, {"data": 0})
            assert victim not in container_ids(pid, "slow")
            await wait_until(lambda: other.tally.ok >= 20, 30, "the other model's calls")
        assert other.tally.lost == 0 and other.tally.clear_errors == 0, other.tally


async def test_requests_racing_a_pause(redis_url: str, state_dir: Path, model_image: str) -> None:
    """Calls spaced about the idle timeout: the reaper pauses the replica as calls arrive; each is served."""
    async with running_stack(redis_url, state_dir, "docker", reaper_interval_s=0.02) as stack:
        await stack.customer("acme")
        await stack.deploy("echo", model_image, "models:echo", idle_timeout_s=0.1)
        async with traffic(stack, "echo", rate_per_s=8, callers=1) as calls:
            await wait_until(lambda: calls.tally.starts["lukewarm"] >= 5 and calls.tally.starts["warm"] >= 5, 90,
                             "calls that met a paused replica and calls that beat the pause")
        assert calls.tally.lost == 0 and calls.tally.clear_errors == 0, calls.tally


async def test_requests_racing_an_eviction(redis_url: str, state_dir: Path, model_image: str) -> None:
    """One replica fits the host: each model's start evicts the other's idle one while calls for it arrive.

    Both models are served, in turns: a start that evicted for room keeps that room (another start
    cannot take it while the victim's container is removed), and one refused while the other model's
    replica is busy waits for it to end rather than answering 503 at once. Once, before either, one
    model got every call and the other 503 for three minutes."""
    async with running_stack(redis_url, state_dir, "docker", max_replicas=1, reaper_interval_s=0.05) as stack:
        await stack.customer("acme")
        for model in ("echo", "again"):
            await stack.deploy(model, model_image, "models:echo")
        async with traffic(stack, "echo", rate_per_s=4, callers=1) as a, \
                traffic(stack, "again", rate_per_s=4, callers=1) as b:
            try:
                await wait_until(lambda: a.tally.starts["cold"] + b.tally.starts["cold"] >= 3 and a.tally.ok >= 8
                                 and b.tally.ok >= 8, 180, "replicas evicted and started again, both models served")
            except TimeoutError as exc:
                raise AssertionError(f"{exc}: {a.tally.figures()} {a.tally.starts} / {b.tally.figures()} "
                                     f"{b.tally.starts}") from None
        for tally in (a.tally, b.tally):
            assert tally.lost == 0, tally.lost_examples
            # The only clear error allowed: the one replica busy with the other model's call (503, retry).
            assert set(tally.errors) <= {"503 unavailable"}, tally
