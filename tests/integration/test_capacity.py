"""N replicas of a version on the real stack: out under concurrent load up to capacity.max, and back."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from runtime_proxy.replicas import ROOM_WAIT_S
from tests.support.stack import REPO_ROOT, Stack, running_stack, wait_until

pytestmark = [pytest.mark.timeout(240)]

MODELS = f"dir:{REPO_ROOT / 'tests' / 'support' / 'models'}"


@pytest.fixture
async def stack(redis_url: str, state_dir: Path) -> AsyncIterator[Stack]:
    async with running_stack(redis_url, state_dir, "process", reaper_interval_s=0.1,
                             pause_stop_after_s=0.5) as s:
        await s.customer("acme")
        yield s


async def replicas_of(stack: Stack, model: str) -> list[dict[str, Any]]:
    assert stack.session is not None
    out = []
    for proxy in stack.proxies:
        out += [r for r in (await proxy.state(stack.session))["replicas"] if r["version"].startswith(f"acme/{model}/")]
    return out


async def burst(stack: Stack, model: str, callers: int, seconds: float) -> list[tuple[int, Any, Any]]:
    return list(await asyncio.gather(*(stack.call(model, seconds, timeout_s=60) for _ in range(callers))))


async def test_concurrent_callers_get_their_own_replicas_up_to_max(stack: Stack) -> None:
    """3 concurrent callers of a 0.4 s model with max 3 → 3 replicas on one proxy, all answered."""
    await stack.deploy("slow", MODELS, "models:slow", capacity={"min": 0, "desired": 1, "max": 3})
    assert (await stack.call("slow", 0))[0] == 200
    answers = await burst(stack, "slow", 3, 0.4)
    assert [a[0] for a in answers] == [200, 200, 200], answers
    await wait_until(lambda: _count(stack, "slow", {"running", "paused"}, 3), 10, "3 replicas")
    # A second burst finds them warm: every call is served without a start.
    answers = await burst(stack, "slow", 3, 0.4)
    assert [a[0] for a in answers] == [200, 200, 200]
    assert len(await replicas_of(stack, "slow")) == 3


async def test_never_more_than_max_replicas(stack: Stack) -> None:
    """6 callers, max 2: two replicas, the rest wait their turn (none is refused within the deadline)."""
    await stack.deploy("slow", MODELS, "models:slow", capacity={"min": 0, "desired": 1, "max": 2})
    answers = await burst(stack, "slow", 6, 0.3)
    assert [a[0] for a in answers] == [200] * 6, answers
    assert len(await replicas_of(stack, "slow")) == 2


async def test_back_to_min_after_idle(redis_url: str, state_dir: Path) -> None:
    """Three replicas under load; idle, the extra ones go paused → stopped → removed, down to min (1)."""
    async with running_stack(redis_url, state_dir, "process", reaper_interval_s=0.1, pause_stop_after_s=0.3,
                             stop_remove_after_s=0.3) as stack:
        await stack.customer("acme")
        await stack.deploy("slow", MODELS, "models:slow", idle_timeout_s=0.3,
                           capacity={"min": 1, "desired": 1, "max": 3})
        await burst(stack, "slow", 3, 0.3)
        assert len(await replicas_of(stack, "slow")) == 3

        async def down_to_min() -> bool:
            return [r["state"] for r in await replicas_of(stack, "slow")] == ["stopped"]

        await wait_until(down_to_min, 30, "one stopped replica left (min 1)")
        status, _, headers = await stack.call("slow", 0)
        assert status == 200 and 'start;desc="lukewarm"' in headers["Server-Timing"]


async def test_idle_replicas_go_lukewarm_then_zero(redis_url: str, state_dir: Path) -> None:
    async with running_stack(redis_url, state_dir, "process", reaper_interval_s=0.1, pause_stop_after_s=0.5,
                             stop_remove_after_s=3600) as stack:
        await stack.customer("acme")
        await stack.deploy("slow", MODELS, "models:slow", idle_timeout_s=0.5,
                           capacity={"min": 0, "desired": 1, "max": 3})
        await burst(stack, "slow", 3, 0.3)
        await wait_until(lambda: _count(stack, "slow", {"running"}, 0, at_least=False), 20,
                         "no replica running once idle")
        states = {r["state"] for r in await replicas_of(stack, "slow")}
        assert states <= {"paused", "stopped"}, states
        # Lukewarm, not gone: the next call is not a cold start.
        status, _, headers = await stack.call("slow", 0)
        assert status == 200 and 'start;desc="lukewarm"' in headers["Server-Timing"], headers["Server-Timing"]


async def _count(stack: Stack, model: str, states: set[str], n: int, at_least: bool = True) -> bool:
    found = sum(1 for r in await replicas_of(stack, model) if r["state"] in states)
    return found >= n if at_least else found == n


async def test_rollback_is_one_call(stack: Stack) -> None:
    path = "/api/v1/customers/acme/models/echo/branches/main/rollback"
    for _ in range(3):
        await stack.deploy("echo", MODELS, "models:echo")
    assert await stack.admin("POST", path, {}) == (200, {"latest": 2, "previous": 3})
    assert (await stack.call("echo", "x"))[2]["X-Model-Version"] == "2"
    assert await stack.admin("POST", path, {"version": 3}) == (200, {"latest": 3, "previous": 2})
    status, body = await stack.admin("POST", path, {"version": 9})
    assert (status, body["type"]) == (404, "not_found")
    assert (await stack.admin("DELETE", "/api/v1/customers/acme/models/echo/branches/main/versions/1"))[0] == 204
    assert (await stack.admin("POST", path, {}))[0] == 200  # 3 → 2
    status, body = await stack.admin("POST", path, {})
    assert (status, body["type"]) == (409, "conflict")  # nothing live before 2


async def test_a_failed_rollout_leaves_latest_and_says_why(stack: Stack) -> None:
    await stack.deploy("echo", MODELS, "models:echo")
    status, body = await stack.admin("POST", "/api/v1/customers/acme/models/echo/branches/main/versions",
                                     {"image": MODELS, "entrypoint": "broken:predict", "capacity": {"min": 1}})
    assert (status, body["type"]) == (422, "prewarm_failed"), body
    assert "model_load_failed" in body["error"] and "nope_this_module_does_not_exist" in body["error"]
    status, _, headers = await stack.call("echo", "x")
    assert status == 200 and headers["X-Model-Version"] == "1"


async def test_batch_work_yields_to_on_demand_requests(stack: Stack) -> None:
    """One replica, busy: a batch request queued first still lets a later on-demand one go first."""
    await stack.deploy("slow", MODELS, "models:slow", capacity={"min": 0, "desired": 1, "max": 1})
    assert (await stack.call("slow", 0))[0] == 200
    assert stack.session is not None
    proxy = stack.proxies[0]

    async def waiting(n: int) -> bool:
        state = await proxy.state(stack.session)  # type: ignore[arg-type]
        return sum(state["waiting"].values()) == n

    finished: list[str] = []

    async def call(name: str, seconds: float, priority: str) -> None:
        headers = {"Authorization": stack.key, "Host": "acme.localhost", "X-Lukewarm-Priority": priority}
        status, body, _ = await stack.request("POST", "/v1/slow/latest", {"data": seconds}, headers, 60)
        assert status == 200, body
        finished.append(name)

    busy = asyncio.ensure_future(call("busy", 1.5, "on-demand"))
    await wait_until(lambda: _count_in_flight(stack, 1), 10, "the replica to be busy")
    batch = asyncio.ensure_future(call("batch", 0.1, "batch"))
    await wait_until(lambda: waiting(1), 10, "the batch request to wait")
    on_demand = asyncio.ensure_future(call("on-demand", 0.1, "on-demand"))
    await wait_until(lambda: waiting(2), 10, "both to wait")
    await asyncio.gather(busy, batch, on_demand)
    assert finished == ["busy", "on-demand", "batch"]
    status, body, _ = await stack.request("POST", "/v1/slow/latest", {"data": 0},
                                          {"Authorization": stack.key, "Host": "acme.localhost",
                                           "X-Lukewarm-Priority": "urgent"})
    assert (status, body["type"]) == (400, "bad_request")


async def _count_in_flight(stack: Stack, n: int) -> bool:
    return sum(r["in_flight"] for r in await replicas_of(stack, "slow")) == n


async def test_with_two_proxies_a_burst_scales_out_within_the_fleet_wide_max(redis_url: str, state_dir: Path) -> None:
    """A burst queues behind the warm replica rather than paying a cold start elsewhere (spread never makes
    a request slower); the proxy where the queue stands adds replicas once it would outlast a start, and the
    fleet never runs more than capacity.max. (Replicas are packed where the load is: spreading a version
    over hosts for availability is capacity.min's, see test_reconciler.)"""
    async with running_stack(redis_url, state_dir, "process", proxies=2) as stack:
        await stack.customer("acme")
        await stack.deploy("slow", MODELS, "models:slow", capacity={"min": 0, "desired": 1, "max": 3})
        assert (await stack.call("slow", 0))[0] == 200
        answers = await burst(stack, "slow", 3, 0.4)
        assert [a[0] for a in answers] == [200, 200, 200], answers
        assert stack.session is not None
        session = stack.session

        async def per_proxy() -> list[int]:
            return [len((await p.state(session))["replicas"]) for p in stack.proxies]

        assert 2 <= sum(await per_proxy()) <= 3, await per_proxy()
        answers = await burst(stack, "slow", 6, 0.4)  # twice the max: queued, never a fourth replica
        assert [a[0] for a in answers] == [200] * 6, answers
        assert sum(await per_proxy()) <= 3, await per_proxy()


async def test_on_demand_work_preempts_batch_work_on_a_full_host(redis_url: str, state_dir: Path) -> None:
    async with running_stack(redis_url, state_dir, "process", max_replicas=1) as stack:
        await stack.customer("acme")
        globex_key = await stack.create_customer("globex")
        await stack.deploy("slow", MODELS, "models:slow")
        await stack.deploy("echo", MODELS, "models:echo", customer="globex")
        headers = {"Authorization": stack.key, "Host": "acme.localhost", "X-Lukewarm-Priority": "batch"}
        batch = asyncio.ensure_future(stack.request("POST", "/v1/slow/latest", {"data": 30}, headers, 60))
        await wait_until(lambda: _count_in_flight(stack, 1), 20, "the batch work to run")
        status, body, _ = await stack.call("echo", "now", key=globex_key, customer="globex", timeout_s=30)
        assert (status, body) == (200, {"data": {"echo": "now"}})
        status, body, headers = await batch
        assert (status, body["type"]) == (503, "preempted") and int(headers["Retry-After"]) >= 1, body


async def test_on_demand_work_waits_rather_than_preempting_on_demand_work(redis_url: str, state_dir: Path) -> None:
    """A full host whose replicas are all busy with on-demand work: a start there waits for one to end
    (``ROOM_WAIT_S``) and then takes its place; past that wait it gets 503. Nothing busy is preempted."""
    async with running_stack(redis_url, state_dir, "process", max_replicas=1) as stack:
        await stack.customer("acme")
        globex_key = await stack.create_customer("globex")
        await stack.deploy("slow", MODELS, "models:slow")
        await stack.deploy("echo", MODELS, "models:echo", customer="globex")
        busy = asyncio.ensure_future(stack.call("slow", 0.5, timeout_s=60))
        await wait_until(lambda: _count_in_flight(stack, 1), 20, "the on-demand work to run")
        status, body, _ = await stack.call("echo", "soon", key=globex_key, customer="globex", timeout_s=30)
        assert (status, body) == (200, {"data": {"echo": "soon"}})  # it waited for the call to end
        assert busy.done() and (await busy)[0] == 200  # which was not cut short for it

        busy = asyncio.ensure_future(stack.call("slow", 2 * ROOM_WAIT_S + 2, timeout_s=60))
        await wait_until(lambda: _count_in_flight(stack, 1), 20, "the on-demand work to run again")
        t0 = time.monotonic()
        status, body, headers = await stack.call("echo", "now", key=globex_key, customer="globex", timeout_s=30)
        assert status == 503 and body["type"] == "unavailable", body  # the host is full of on-demand work
        assert ROOM_WAIT_S <= time.monotonic() - t0 and int(headers["Retry-After"]) == ROOM_WAIT_S
        assert not busy.done()
        assert (await busy)[0] == 200


async def test_retiring_or_patching_a_version_reaches_its_replicas(redis_url: str, state_dir: Path) -> None:
    """A retired keep-warm version stops holding a replica; a PATCH of its settings reaches the proxy."""
    async with running_stack(redis_url, state_dir, "process", reaper_interval_s=0.1, spec_cache_s=0.2) as stack:
        await stack.customer("acme")
        path = "/api/v1/customers/acme/models/{m}/branches/main/versions/1"
        for model in ("retired", "patched"):
            await stack.deploy(model, MODELS, "models:echo", keep_warm=True, idle_timeout_s=0.2)
            assert (await stack.call(model, 1))[0] == 200
        assert (await stack.admin("DELETE", path.format(m="retired")))[0] == 204
        status, _ = await stack.admin("PATCH", path.format(m="patched"), {"keep_warm": False})
        assert status == 200

        async def followed() -> bool:
            return (not await replicas_of(stack, "retired")
                    and [r["state"] for r in await replicas_of(stack, "patched")] == ["paused"])

        await wait_until(followed, 20, "the retired replica gone and the patched one paused")
