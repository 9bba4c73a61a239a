"""Faults: an upgrade of the whole fleet under load. Every ingress and every proxy is restarted in turn
(SIGTERM: each drains, then a new process starts); callers spread over the ingresses like a load
balancer. Nothing is lost; a draining ingress finishes the calls it holds."""
from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import orjson
import pytest

from loadtests.common import IngressProcess
from loadtests.traffic import Traffic
from tests.faults.test_proxy_restart import MODELS
from tests.support.stack import running_stack, wait_until

pytestmark = [pytest.mark.timeout(300)]


async def test_a_draining_ingress_finishes_what_it_holds_and_takes_nothing_new(redis_url: str,
                                                                              state_dir: Path) -> None:
    async with running_stack(redis_url, state_dir, "process") as stack:
        await stack.customer("acme")
        await stack.deploy("slow", MODELS, "models:slow")
        ingress = IngressProcess(redis_url, state_dir, "drain")
        try:
            await ingress.start()
            async with aiohttp.ClientSession() as session:
                async def call(seconds: float) -> tuple[int, object]:
                    async with session.post(f"{ingress.url}/v1/slow/latest", data=orjson.dumps({"data": seconds}),
                                            headers=stack.call_headers(),
                                            timeout=aiohttp.ClientTimeout(total=60)) as resp:
                        return resp.status, orjson.loads(await resp.read())

                assert await call(0) == (200, {"data": 0})
                held = asyncio.ensure_future(call(2.0))

                async def in_flight() -> bool:
                    replicas = (await stack.proxies[0].state(stack.session))["replicas"]
                    return any(r["in_flight"] for r in replicas)  # type: ignore[union-attr]

                await wait_until(in_flight, 20, "the call to reach the model")
                ingress.terminate()
                assert await asyncio.wait_for(held, 30) == (200, {"data": 2.0})
                assert await asyncio.to_thread(ingress.wait, 30) == 0
                with pytest.raises(aiohttp.ClientConnectorError):
                    await call(0)
            assert "draining requests in flight" in ingress.log()
        finally:
            ingress.stop()


async def test_a_rolling_restart_of_every_ingress_and_proxy_under_load(redis_url: str, state_dir: Path) -> None:
    async with running_stack(redis_url, state_dir, "process", proxies=2) as stack:
        await stack.customer("acme")
        await stack.deploy("echo", MODELS, "models:echo", capacity={"min": 0, "max": 2})
        ingresses = [IngressProcess(redis_url, state_dir, f"i{n}") for n in range(2)]
        try:
            for ingress in ingresses:
                await ingress.start()
            traffic = Traffic([i.url for i in ingresses], stack.call_headers(), "/v1/echo/latest",
                              lambda n: {"data": n, "timeout_seconds": 30}, callers=4, timeout_s=40, rate_per_s=40,
                              expected=lambda n, body: body == {"data": {"echo": n}})
            async with traffic:
                async def flowing(more: int = 20) -> None:
                    seen = traffic.tally.ok
                    await wait_until(lambda: traffic.tally.ok >= seen + more, 60, "calls answered")

                await flowing()
                for proxy in stack.proxies:
                    proxy.stop()  # SIGTERM: it leaves the fleet, finishes its chunks, exits
                    await proxy.start()
                    await stack.wait_for_proxies(2)
                    await flowing()
                for ingress in ingresses:
                    ingress.terminate()
                    assert await asyncio.to_thread(ingress.wait, 60) == 0
                    await ingress.start()
                    await flowing()
            tally = traffic.tally
            assert tally.lost == 0, tally.lost_examples
            assert tally.ok >= 100, tally
        finally:
            for ingress in ingresses:
                ingress.stop()
