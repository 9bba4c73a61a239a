"""The autoscaler: a pure function of (stats, capacity, settings, now, state), tested from tables;
and the loop around it (ingress/reconciler.py) driven round by round with fakes."""
from __future__ import annotations

import asyncio
from typing import Any

import fakeredis.aioredis
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingress.autoscale import AutoscaleSettings, AutoscaleState, ScaleDecision, VersionStats, desired_replicas
from ingress.costs import CostBook
from ingress.reconciler import Reconciler, autoscale_settings, fleet_stats
from ingress.router import ProxyState, ReplicaState, StartCosts
from shared.messages import Capacity, VersionSpec
from shared.settings import IngressSettings

SETTINGS = AutoscaleSettings(max_concurrency=1.0, downscale_delay_s=30.0, downscale_to_zero_delay_s=300.0,
                             cold_start_patience=1.0)
COSTS = StartCosts(lukewarm_ms=25.0, cold_ms=400.0, infer_ms=5.0)


def stats(demand: int, running: int = 0, lukewarm: int = 0, cold_ms: float = 400.0,
          infer_ms: float = 5.0) -> VersionStats:
    return VersionStats(demand=demand, running=running, lukewarm=lukewarm,
                        costs=StartCosts(lukewarm_ms=25.0, cold_ms=cold_ms, infer_ms=infer_ms))


def cap(low: int = 0, high: int = 4) -> Capacity:
    return Capacity(min=low, desired=max(1, low), max=high)


@pytest.mark.parametrize(
    ("given_stats", "capacity", "expected"),
    [
        # idle and nothing asked for: nothing
        (stats(0), cap(0), ScaleDecision(0, 0, 0, "steady")),
        # the floor: min ready, started at once whatever the load
        (stats(0), cap(2), ScaleDecision(2, 0, 2, "floor")),
        (stats(0, running=1), cap(2), ScaleDecision(2, 0, 1, "floor")),
        (stats(0, lukewarm=2), cap(2), ScaleDecision(2, 0, 0, "steady")),  # lukewarm counts as ready
        (stats(0, running=1, lukewarm=1), cap(2), ScaleDecision(2, 0, 0, "steady")),
        (stats(0, running=3), cap(2), ScaleDecision(2, 0, 0, "steady")),  # above the floor: left to idle policy
        # fast up from nothing: every request would wait for a start anyway
        (stats(3), cap(0), ScaleDecision(3, 0, 3, "cold")),
        (stats(10), cap(0, 4), ScaleDecision(4, 0, 4, "cold")),  # never above max
        (stats(10, running=4), cap(0, 4), ScaleDecision(4, 0, 0, "steady")),
        (stats(10, running=5), cap(0, 4), ScaleDecision(4, 0, 0, "steady")),  # over max already: adds nothing
        # lukewarm first: woken at once, no cold start
        (stats(3, running=1, lukewarm=2), cap(0), ScaleDecision(3, 2, 0, "wake")),
        (stats(3, running=1, lukewarm=5), cap(0), ScaleDecision(3, 2, 0, "wake")),
        (stats(9, running=1, lukewarm=5), cap(0, 4), ScaleDecision(4, 3, 0, "wake")),  # wake only up to max
        # the rest would start cold: not for a queue that drains faster than a cold start
        (stats(4, running=1, lukewarm=1), cap(0), ScaleDecision(4, 1, 0, "wake")),
        (stats(2, running=1), cap(0), ScaleDecision(2, 0, 0, "wait_cold")),
        # ... but at once for one that takes longer (99 waiting × 50 ms on one replica > 400 ms)
        (stats(100, running=1, infer_ms=50.0), cap(0), ScaleDecision(4, 0, 3, "cold")),
        (stats(2, running=1, cold_ms=3.0, infer_ms=5.0), cap(0), ScaleDecision(2, 0, 1, "cold")),  # cheap cold
        # the floor and the load together: the floor's new replicas serve the load too
        (stats(3, running=0), cap(2), ScaleDecision(3, 0, 3, "cold")),
        (stats(1, running=0), cap(2), ScaleDecision(2, 0, 2, "floor")),
        (stats(2, running=1, lukewarm=1), cap(3), ScaleDecision(3, 1, 1, "floor")),
    ],
)
def test_one_decision(given_stats: VersionStats, capacity: Capacity, expected: ScaleDecision) -> None:
    decision, _ = desired_replicas(given_stats, capacity, SETTINGS, 1000.0, AutoscaleState())
    assert decision == expected


@pytest.mark.parametrize(
    ("concurrency", "demand", "running", "replicas"),
    [
        (4.0, 8, 2, 2),  # 8 in flight at 4 per replica: the two there suffice
        (4.0, 9, 2, 3),
        (2.0, 3, 0, 2),
        (0.5, 2, 0, 4),  # a target below one request per replica
    ],
)
def test_target_is_in_flight_per_replica(concurrency: float, demand: int, running: int, replicas: int) -> None:
    settings = AutoscaleSettings(max_concurrency=concurrency)
    decision, _ = desired_replicas(stats(demand, running=running), cap(0, 8), settings, 0.0, AutoscaleState())
    assert decision.replicas == replicas


def run(steps: list[tuple[float, VersionStats]], settings: AutoscaleSettings = SETTINGS) -> list[ScaleDecision]:
    """Decisions over time (capacity 0..8), each state handed to the next call."""
    state, out = AutoscaleState(), []
    for now, given_stats in steps:
        decision, state = desired_replicas(given_stats, cap(0, 8), settings, now, state)
        out.append(decision)
    return out


def test_up_at_once_down_only_after_the_whole_window() -> None:
    replicas = [d.replicas for d in run([
        (0.0, stats(4, running=4)),
        (10.0, stats(1, running=4)),   # lower, but within 30 s of the busy sample
        (29.9, stats(1, running=4)),
        (30.0, stats(1, running=4)),   # the busy sample left the window: every sample asks for 1
        (31.0, stats(6, running=1)),   # up again at once
        (32.0, stats(2, running=6)),
    ])]
    assert replicas == [4, 4, 4, 1, 6, 6]


def test_down_steps_follow_the_busiest_sample_left_in_the_window() -> None:
    replicas = [d.replicas for d in run([
        (0.0, stats(6, running=6)),
        (10.0, stats(4, running=6)),
        (20.0, stats(2, running=6)),
        (30.0, stats(2, running=6)),   # 6 left the window; 4 (t=10) is the busiest left
        (40.0, stats(2, running=6)),
    ])]
    assert replicas == [6, 6, 6, 4, 2]


def test_to_zero_only_after_the_idle_delay() -> None:
    replicas = [d.replicas for d in run([
        (0.0, stats(2, running=2)),
        (1.0, stats(0, running=2)),
        (40.0, stats(0, running=2)),   # past the downscale window: 1, not 0
        (299.9, stats(0, running=1)),
        (300.0, stats(0, running=1)),  # 300 s without a request: 0
        (301.0, stats(0)),
    ])]
    assert replicas == [2, 2, 1, 1, 0, 0]


def test_zero_never_comes_back_to_one_by_itself() -> None:
    assert [d.replicas for d in run([(0.0, stats(0)), (500.0, stats(0))])] == [0, 0]


def test_with_no_request_in_flight_nothing_is_woken_while_the_target_comes_down() -> None:
    """The proxies' idle policy paused them: the loop must not wake them again while it waits out its window."""
    decisions = run([(0.0, stats(3, running=3)), (5.0, stats(0, running=0, lukewarm=3))])
    assert decisions[1] == ScaleDecision(3, 0, 0, "steady")


def test_a_cold_start_waits_until_the_overload_has_lasted_one() -> None:
    steps = [(t, stats(2, running=1, cold_ms=2000.0)) for t in (0.0, 1.0, 1.9, 2.0)]
    assert [(d.reason, d.cold) for d in run(steps)] == [("wait_cold", 0), ("wait_cold", 0), ("wait_cold", 0),
                                                        ("cold", 1)]


def test_patience_scales_the_wait() -> None:
    settings = AutoscaleSettings(cold_start_patience=3.0)
    steps = [(t, stats(2, running=1, cold_ms=1000.0)) for t in (0.0, 2.9, 3.0)]
    assert [d.cold for d in run(steps, settings=settings)] == [0, 0, 1]


def test_the_overload_clock_restarts_once_it_is_met() -> None:
    steps = [
        (0.0, stats(2, running=1, cold_ms=2000.0)),
        (1.0, stats(1, running=1, cold_ms=2000.0)),  # enough again
        (2.0, stats(2, running=1, cold_ms=2000.0)),  # short again: from now, not from t=0
        (3.9, stats(2, running=1, cold_ms=2000.0)),
        (4.0, stats(2, running=1, cold_ms=2000.0)),
    ]
    assert [d.cold for d in run(steps)] == [0, 0, 0, 0, 1]


def test_the_state_keeps_only_the_window() -> None:
    state = AutoscaleState()
    for t in range(100):
        _, state = desired_replicas(stats(1, running=1), cap(0), SETTINGS, float(t), state)
    assert len(state.samples) == 30 and state.samples[0][0] == 70.0


@given(
    low=st.integers(0, 5), extra=st.integers(0, 5),
    steps=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 12), st.integers(0, 6), st.floats(0, 20)),
                   min_size=1, max_size=30),
)
def test_bounds_hold_whatever_the_history(low: int, extra: int, steps: list[tuple[int, int, int, float]]) -> None:
    capacity = Capacity(min=low, desired=max(1, low), max=max(1, low + extra))
    state, now = AutoscaleState(), 0.0
    for demand, running, lukewarm, dt in steps:
        now += dt
        decision, state = desired_replicas(stats(demand, running, lukewarm), capacity, SETTINGS, now, state)
        assert capacity.min <= decision.replicas <= capacity.max
        assert 0 <= decision.wake <= lukewarm
        assert decision.cold >= 0
        if running < capacity.max:
            assert running + decision.wake + decision.cold <= capacity.max  # never more than max running
        else:
            assert decision.wake == decision.cold == 0
        assert running + lukewarm + decision.cold >= capacity.min  # the floor is always met


# ---- the loop around it (ingress/reconciler.py): its inputs, and rounds driven with fakes ------

KEY = "acme/echo/main/1"


def beat(pid: str, *replicas: ReplicaState, ts: float = 1000.0, waiting: int = 0) -> ProxyState:
    return ProxyState(proxy_id=pid, url=f"http://{pid}", epoch=1, ts=ts, replicas=replicas, cpus=8,
                      memory_mb=32_768, memory_available_mb=30_000, waiting=((KEY, waiting),) if waiting else ())


def replica(state: str, in_flight: int = 0, version: str = KEY, concurrency: int = 1) -> ReplicaState:
    return ReplicaState(version=version, state=state, in_flight=in_flight, concurrency=concurrency, memory_mb=512)


@pytest.mark.parametrize(
    ("proxies", "pending", "expected"),
    [
        ([beat("a", replica("running", 1), replica("paused")), beat("b", replica("stopped"), waiting=3)], {},
         (4, 1, 2)),
        ([beat("a", replica("starting"), replica("running", version="x/y/main/1", in_flight=5))], {}, (0, 1, 0)),
        # a warm call in flight counts as what it asked for, woken from lukewarm ones first
        ([beat("a", replica("paused"), replica("paused")), beat("b")], {"a": 1, "b": 2}, (0, 3, 1)),
        ([beat("a", replica("running"), replica("running"))], {"a": 1}, (0, 2, 0)),
    ],
)
def test_fleet_stats(proxies: list[ProxyState], pending: dict[str, int], expected: tuple[int, int, int]) -> None:
    got = fleet_stats(KEY, proxies, pending, COSTS)
    assert (got.demand, got.running, got.lukewarm) == expected


def test_autoscale_settings_follow_the_version() -> None:
    settings = IngressSettings(downscale_delay_s=30.0, downscale_to_zero_delay_s=300.0)
    spec = VersionSpec("acme", "echo", "main", 1, "img", idle_timeout_s=10.0)
    got = autoscale_settings(spec, [beat("a", replica("running", concurrency=4))], settings)
    # the hosts' replica concurrency; delays within the idle timeout (else the loop wakes what idles)
    assert (got.max_concurrency, got.downscale_delay_s, got.downscale_to_zero_delay_s) == (4.0, 10.0, 10.0)
    warm = autoscale_settings(VersionSpec("acme", "echo", "main", 1, "img", idle_timeout_s=10.0, keep_warm=True),
                              [], settings)
    assert (warm.max_concurrency, warm.downscale_delay_s) == (1.0, 30.0)


class FakeView:
    def __init__(self, spec: VersionSpec) -> None:
        self.spec = spec
        self.proxies: list[ProxyState] = []
        self.now = 1000.0

    def live_proxies(self) -> list[ProxyState]:
        return list(self.proxies)

    def routing_now(self) -> float:
        return self.now

    async def version(self, customer: str, model: str, branch: str, number: int) -> VersionSpec:
        return self.spec


class FakeLease:
    held = True
    epoch = 7

    async def hold(self) -> bool:
        return self.held

    async def release(self) -> None:
        self.held = False


class FakeProxies:
    """Records warm calls; each waits until the test lets it answer."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.answer = asyncio.Event()

    async def warm(self, url: str, chunk: Any, replicas: int = 1) -> dict[str, Any]:
        self.calls.append((url, replicas))
        await self.answer.wait()
        return {}


async def test_rounds_place_the_floor_once_and_restore_it_after_a_proxy_dies() -> None:
    spec = VersionSpec("acme", "echo", "main", 1, "img", created_at=0.0, capacity=Capacity(min=2, desired=2, max=4))
    view, proxies, now = FakeView(spec), FakeProxies(), [1000.0]
    client = fakeredis.aioredis.FakeRedis()
    await client.hset("lw:capacity:floor", KEY, 2)

    class Registry:
        redis = client

    loop = Reconciler(view, Registry(), proxies, CostBook(), FakeLease(),  # type: ignore[arg-type]
                      IngressSettings(new_version_grace_s=0.0), clock=lambda: now[0])
    view.proxies = [beat("a", ts=999.5), beat("b", ts=999.5)]
    assert await loop.run_once()
    await asyncio.sleep(0)
    assert sorted(proxies.calls) == [("http://a", 1), ("http://b", 1)]  # spread: one on each

    # calls in flight count: nothing more is asked
    assert await loop.run_once()
    await asyncio.sleep(0)
    assert len(proxies.calls) == 2
    # answered, but the heartbeats are older than the answers: still nothing more
    proxies.answer.set()
    for _ in range(3):
        await asyncio.sleep(0)
    now[0] = 1001.0
    assert await loop.run_once()
    await asyncio.sleep(0)
    assert len(proxies.calls) == 2
    # the heartbeats show them: the floor is met
    view.proxies = [beat("a", replica("running"), ts=1002.0), beat("b", replica("running"), ts=1002.0)]
    now[0] = 1002.5
    assert await loop.run_once()
    await asyncio.sleep(0)
    assert len(proxies.calls) == 2 and loop.last[KEY].reason == "steady"

    # b dies: its heartbeat goes; a is asked to run both
    view.proxies = [beat("a", replica("running"), ts=1003.0)]
    now[0] = 1003.5
    assert await loop.run_once()
    await asyncio.sleep(0)
    assert proxies.calls[2:] == [("http://a", 2)]
    await loop.stop()
    await client.aclose()


async def test_without_the_lease_a_round_does_nothing() -> None:
    spec = VersionSpec("acme", "echo", "main", 1, "img", capacity=Capacity(min=1, desired=1, max=2))
    view, proxies = FakeView(spec), FakeProxies()
    view.proxies = [beat("a")]
    lease = FakeLease()
    lease.held = False

    class Registry:
        redis = fakeredis.aioredis.FakeRedis()

    loop = Reconciler(view, Registry(), proxies, CostBook(), lease,  # type: ignore[arg-type]
                      IngressSettings(new_version_grace_s=0.0))
    assert not await loop.run_once()
    assert proxies.calls == [] and loop.rounds == 0
