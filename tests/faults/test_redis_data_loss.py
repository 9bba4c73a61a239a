"""Faults: Redis comes back empty (restored without data); proxies keep their replicas, a restarted
proxy is routed to again (its epoch outranks every one an ingress remembers), every call is answered."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import orjson
import pytest
import redis.asyncio as redis

from ingress import state
from shared import keys
from tests.faults.test_proxy_restart import MODELS, echo_traffic
from tests.support.stack import running_stack, wait_until

pytestmark = [pytest.mark.timeout(180)]


async def test_redis_data_loss_then_a_proxy_restart(redis_url: str, state_dir: Path) -> None:
    async with running_stack(redis_url, state_dir, "process", proxies=2, reaper_interval_s=0.2,
                             spec_cache_s=0.5) as stack:
        await stack.customer("acme")
        # A replica on each proxy (capacity.min 2 spreads over hosts): each proxy's reaper has one to find
        # without a record. With min 0 the calls could all go to one proxy, and the other had none.
        await stack.deploy("echo", MODELS, "models:echo", capacity={"min": 2, "max": 2})
        view = stack.app[state.VIEW]
        async with echo_traffic(stack, callers=2, timeout_s=10) as traffic:
            await wait_until(lambda: traffic.tally.ok >= 20, 30, "calls flowing")
            await wait_until(lambda: all(view.proxies[p.proxy_id].replicas for p in stack.proxies), 30,
                             "a replica of the version on each proxy")
            replicas_before = {p.proxy_id: len(view.proxies[p.proxy_id].replicas) for p in stack.proxies}
            old_epoch = view.epochs[stack.proxies[0].proxy_id]
            client = redis.Redis.from_url(redis_url)
            await client.flushdb()  # the data loss: customers, keys, versions, epochs, all gone
            # Calls now fail clearly (the key is unknown once its cache expires) and nothing else breaks.
            seen = traffic.tally.clear_errors
            await wait_until(lambda: traffic.tally.clear_errors >= seen + 10, 30, "clear errors after the loss")
            # Several reaper rounds with no record of the version: the replicas stay (no positive evidence).
            log_marker = "has no record in the registry"
            await wait_until(lambda: all(log_marker in p.log() for p in stack.proxies), 15,
                             "each proxy to notice the missing record")
            assert {p.proxy_id: len(view.proxies[p.proxy_id].replicas) for p in stack.proxies} == replicas_before

            restarted = stack.proxies[0]
            restarted.stop()
            await restarted.start()
            await wait_until(lambda: view.epochs.get(restarted.proxy_id, 0) > old_epoch, 15,
                             "the restarted proxy's heartbeat to be taken despite the counter starting over")
            assert restarted.proxy_id in view.proxies
            # The operator restores the registry (customer, key, the version): calls succeed again.
            stack.key = ""
            await stack.customer("acme")
            traffic.headers["Authorization"] = stack.key
            await stack.deploy("echo", MODELS, "models:echo", capacity={"min": 0, "max": 2})
            seen = traffic.tally.ok
            await wait_until(lambda: traffic.tally.ok >= seen + 20, 30, "calls answered after the restore")
            await client.aclose()
        assert traffic.tally.lost == 0, traffic.tally.lost_examples


async def test_a_number_deployed_again_is_served_though_an_ingress_cached_the_old_deploy(
        redis_url: str, state_dir: Path) -> None:
    """After a data loss the restore deploys version 1 again (a new deploy time) without telling the
    ingresses; the proxy refuses the old one (version_changed) and the ingress reads the version afresh."""
    async with running_stack(redis_url, state_dir, "process", spec_cache_s=0) as stack:  # proxies read at once
        await stack.customer("acme")
        await stack.deploy("echo", MODELS, "models:echo")
        assert (await stack.call("echo", 1))[0] == 200  # the ingress caches version 1 as deployed now
        registry = stack.app[state.REGISTRY]
        old = await registry.require_version("acme", "echo", "main", 1)
        again = dataclasses.replace(old, created_at=old.created_at + 1)
        await registry.redis.set(keys.version("acme", "echo", "main", 1), orjson.dumps(again.to_dict()))  # no event
        status, body, _ = await stack.call("echo", 2)
        assert (status, body) == (200, {"data": {"echo": 2}})
