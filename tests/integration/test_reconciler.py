"""The capacity loop on the real stack (process runtime: the fastest starts): capacity.min kept
ready across proxies, restored when a proxy dies, and one ingress of several deciding (the lease).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from ingress import state as ingress_state
from ingress.app import build_app
from ingress.reconciler import RECONCILER, Reconciler
from loadtests.common import _start_time, descendants
from shared.settings import IngressSettings
from tests.support.stack import ADMIN, REPO_ROOT, SECRET, Stack, free_port, running_stack, wait_until

pytestmark = pytest.mark.timeout(120)

READY = {"starting", "running", "paused", "stopped"}
BRANCH = "/api/v1/customers/acme/models/echo/branches/main"
# Quick loop and lease, and a short grace (a deploy's own pre-warm is over well within it here).
LOOP: dict[str, Any] = {"reconcile_interval_s": 0.2, "lease_ttl_s": 1.5, "new_version_grace_s": 1.0}
# Proxies beat every 0.2 s (Stack) under a short TTL: a killed one leaves the view within ~2 s.
PROXY = {"heartbeat_ttl_s": 1.5}


@contextlib.asynccontextmanager
async def stack_of(redis_url: str, state_dir: Path, proxies: int,
                   ingress: dict[str, Any] | None = None) -> AsyncIterator[Stack]:
    async with running_stack(redis_url, state_dir, "process", proxies=proxies, ingress=ingress, **PROXY) as s:
        await s.customer("acme")
        s.image = f"dir:{REPO_ROOT / 'tests' / 'support' / 'models'}"
        yield s


def ready_by_proxy(stack: Stack, version: str) -> dict[str, int]:
    """Ready replicas (warm or lukewarm) of ``version`` per live proxy, as the ingress's view has them."""
    out: dict[str, int] = {}
    for proxy in stack.app[ingress_state.VIEW].live_proxies():
        n = sum(1 for r in proxy.replicas if r.version == version and r.state in READY)
        if n:
            out[proxy.proxy_id] = n
    return out


def kill_with_replicas(stack: Stack, index: int) -> list[tuple[int, int | None]]:
    """SIGKILL a proxy; its replica processes (own sessions) survive it: returned for the cleanup."""
    proxy = stack.proxies[index]
    assert proxy.pid is not None
    orphans = [(pid, started) for pid, started in descendants(proxy.pid) if pid != proxy.pid]
    proxy.kill()
    return orphans


def reap(orphans: list[tuple[int, int | None]]) -> None:
    for pid, started in orphans:
        if started is not None and _start_time(pid) == started:  # still the process we saw, not a reused pid
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


async def test_min_deployed_is_ready_on_each_proxy_and_not_overdone(redis_url: str, state_dir: Path) -> None:
    async with stack_of(redis_url, state_dir, 2, LOOP) as stack:
        version = await stack.deploy("echo", stack.image, "models:echo", capacity={"min": 2, "max": 4})
        key = f"acme/echo/main/{version}"
        await wait_until(lambda: ready_by_proxy(stack, key) == {p.proxy_id: 1 for p in stack.proxies}, 15,
                         "a ready replica on each proxy")
        # Past the grace the loop sees the floor met: nothing more is started.
        await asyncio.sleep(2.5)
        assert ready_by_proxy(stack, key) == {p.proxy_id: 1 for p in stack.proxies}
        reconciler = stack.app[RECONCILER]
        assert reconciler.holding and reconciler.rounds > 0
        assert reconciler.last[key].replicas == 2


async def test_a_patched_floor_is_kept_and_restored_on_another_proxy_when_one_dies(
        redis_url: str, state_dir: Path) -> None:
    orphans: list[tuple[int, int | None]] = []
    try:
        async with stack_of(redis_url, state_dir, 3, LOOP) as stack:
            version = await stack.deploy("echo", stack.image, "models:echo")  # capacity.min 0: nothing runs
            key = f"acme/echo/main/{version}"
            await asyncio.sleep(1.2)  # past the grace: from now on it is the loop's
            assert ready_by_proxy(stack, key) == {}
            status, body = await stack.admin("PATCH", f"{BRANCH}/versions/{version}",
                                             {"capacity": {"min": 2, "max": 4}})
            assert status == 200, body
            # found through the floor index, spread over two distinct proxies
            await wait_until(lambda: sorted(ready_by_proxy(stack, key).values()) == [1, 1], 15,
                             "the patched floor: ready replicas on two proxies")
            holders = set(ready_by_proxy(stack, key))
            victim = next(i for i, p in enumerate(stack.proxies) if p.proxy_id in holders)
            spare = next(p.proxy_id for p in stack.proxies if p.proxy_id not in holders)
            orphans = kill_with_replicas(stack, victim)
            survivor = (holders - {stack.proxies[victim].proxy_id}).pop()
            await wait_until(lambda: ready_by_proxy(stack, key) == {survivor: 1, spare: 1}, 20,
                             "the floor restored on the proxy that had none")
            status, body, _ = await stack.call("echo", "still here")
            assert status == 200 and body == {"data": {"echo": "still here"}}
    finally:
        reap(orphans)


async def test_with_one_proxy_left_it_runs_the_whole_floor(redis_url: str, state_dir: Path) -> None:
    """Several replicas on one host when that is where the room is: the proxy is asked for two
    (``warm``'s ``replicas``) and runs them."""
    orphans: list[tuple[int, int | None]] = []
    try:
        async with stack_of(redis_url, state_dir, 2, LOOP) as stack:
            version = await stack.deploy("echo", stack.image, "models:echo", capacity={"min": 2, "max": 4})
            key = f"acme/echo/main/{version}"
            await wait_until(lambda: sorted(ready_by_proxy(stack, key).values()) == [1, 1], 15,
                             "a ready replica on each proxy")
            orphans = kill_with_replicas(stack, 1)
            survivor = stack.proxies[0].proxy_id
            await wait_until(lambda: ready_by_proxy(stack, key) == {survivor: 2}, 20,
                             "both replicas of the floor on the one proxy left")
    finally:
        reap(orphans)


async def test_a_retired_floor_is_left_alone(redis_url: str, state_dir: Path) -> None:
    async with stack_of(redis_url, state_dir, 1, LOOP) as stack:
        version = await stack.deploy("echo", stack.image, "models:echo")
        status, _ = await stack.admin("PATCH", f"{BRANCH}/versions/{version}", {"capacity": {"min": 1, "max": 2}})
        assert status == 200
        await wait_until(lambda: ready_by_proxy(stack, f"acme/echo/main/{version}") != {}, 15, "the floor kept")
        # Retired: out of the index, so the loop stops keeping it (the proxies' idle policy takes it from there).
        client = stack.app[ingress_state.REGISTRY].redis
        assert await client.hexists("lw:capacity:floor", f"acme/echo/main/{version}")
        status, _ = await stack.admin("DELETE", f"{BRANCH}/versions/{version}")
        assert status == 204
        assert not await client.hexists("lw:capacity:floor", f"acme/echo/main/{version}")


# ---- several ingresses: one decides -----------------------------------------------------------

async def extra_ingress(stack: Stack) -> web.AppRunner:
    port = free_port()
    runner = web.AppRunner(build_app(IngressSettings(
        redis_url=stack.redis_url, admin_token=ADMIN, proxy_secret=SECRET, ingress_host="127.0.0.1",
        ingress_port=port, view_poll_interval_s=0.1, **LOOP)))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def loop_of(runner: web.AppRunner) -> Reconciler:
    return runner.app[RECONCILER]


async def test_of_two_ingresses_exactly_one_reconciles_and_the_other_takes_over(
        redis_url: str, state_dir: Path) -> None:
    # The stack's own ingress stays out of it (interval 0): the two below contend.
    async with stack_of(redis_url, state_dir, 2, {"reconcile_interval_s": 0}) as stack:
        runners = [await extra_ingress(stack), await extra_ingress(stack)]
        try:
            loops = [loop_of(r) for r in runners]
            await wait_until(lambda: any(lp.holding for lp in loops), 5, "one ingress to take the lease")
            holder = next(i for i, lp in enumerate(loops) if lp.holding)
            other = 1 - holder
            for _ in range(20):  # 2 s, about ten rounds
                assert [lp.holding for lp in loops].count(True) == 1
                assert loops[other].rounds == 0, "the ingress without the lease never reconciles"
                await asyncio.sleep(0.1)
            assert loops[holder].rounds >= 5

            # The holder's loop is cancelled (its ingress stops): the other takes over within seconds.
            await runners[holder].cleanup()
            started = asyncio.get_running_loop().time()
            await wait_until(lambda: loops[other].holding, 1.5 + 0.2 + 1.0, "the other ingress to take over")
            took_s = asyncio.get_running_loop().time() - started
            rounds = loops[other].rounds
            await wait_until(lambda: loops[other].rounds > rounds, 2, "the new holder to reconcile")

            # and it does the work: a floor set now is kept by the new holder
            version = await stack.deploy("echo", stack.image, "models:echo")
            await asyncio.sleep(1.2)
            status, _ = await stack.admin("PATCH", f"{BRANCH}/versions/{version}", {"capacity": {"min": 2}})
            assert status == 200
            await wait_until(lambda: sorted(ready_by_proxy(stack, f"acme/echo/main/{version}").values()) == [1, 1],
                             15, "the floor kept by the new holder")
            assert took_s < 2.7, took_s
        finally:
            for runner in runners:
                await runner.cleanup()
