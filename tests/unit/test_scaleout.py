"""The proxy's scale-out patience (runtime_proxy.replica.start_pays): another replica of a version starts
for its waiters only once their queue would outlast a start; tested from tables, and on a VersionPool."""
from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import time
from pathlib import Path

import pytest

from loadtests import sim
from runtime_proxy.harness_client import HarnessClient
from runtime_proxy.lifecycle import State
from runtime_proxy.replica import DEFAULT_START_MS, Pulse, Replica, VersionPool, start_due_in_ms, start_pays
from shared.messages import VersionSpec


@pytest.mark.parametrize(
    ("waiting", "coming", "serving", "service_ms", "start_ms", "pays"),
    [
        (1, 0, 0, 0.0, 400.0, True),     # the first request, no replica: start at once
        (5, 1, 0, 20.0, 400.0, False),   # the version's first start is under way: wait for it, start no second
        (5, 1, 0, 1e6, 400.0, False),    # ... however slow the model: that start is part-way already
        (1, 0, 1, 20.0, 340.0, False),   # one queued behind a 20 ms inference: a start would cost 17 times more
        (17, 0, 1, 20.0, 340.0, True),   # 17 x 20 ms = 340 ms: the queue outlasts a start
        (16, 0, 1, 20.0, 340.0, False),
        (34, 0, 2, 20.0, 340.0, True),   # drained by two slots
        (33, 0, 2, 20.0, 340.0, False),
        (18, 1, 1, 20.0, 340.0, True),   # 17 beyond the one coming
        (17, 1, 1, 20.0, 340.0, False),
        (2, 2, 1, 1e6, 340.0, False),    # every waiter has a slot coming
        (2, 0, 1, 400.0, 300.0, True),   # a slow model: one queued request already outlasts a start
        (0, 0, 1, 400.0, 300.0, False),
    ],
)
def test_start_pays(waiting: int, coming: int, serving: int, service_ms: float, start_ms: float, pays: bool) -> None:
    assert start_pays(waiting, coming, serving, service_ms, start_ms) is pays


def test_patience_scales_the_threshold() -> None:
    assert not start_pays(17, 0, 1, 20.0, 340.0, patience=2.0)
    assert start_pays(34, 0, 1, 20.0, 340.0, patience=2.0)


@pytest.mark.parametrize(
    ("waiting", "coming", "serving", "infer_ms", "oldest_ms", "due"),
    [
        (2, 0, 1, 1.0, 0.0, 150.0),    # 2 x service >= 300 once the running request has run 150 ms
        (2, 0, 1, 1.0, 100.0, 50.0),
        (2, 0, 1, 200.0, 100.0, 0.0),  # due already (start_pays says so too)
        (1, 1, 1, 1.0, 0.0, None),     # nobody beyond the coming slot
        (3, 0, 0, 1.0, 0.0, None),     # nothing serving: the running time of nothing grows nothing
    ],
)
def test_start_due_in_ms(waiting: int, coming: int, serving: int, infer_ms: float, oldest_ms: float,
                         due: float | None) -> None:
    assert start_due_in_ms(waiting, coming, serving, infer_ms, 300.0, oldest_ms) == due


def _replica(state: State, in_flight: int = 0) -> Replica:
    spec = VersionSpec("acme", "m", "main", 1, "img")
    return Replica(replica_id=f"r{random.random()}", spec=spec, handle="h", run_dir=Path(""),
                   client=HarnessClient("", max_idle=0), concurrency=1, state=state, in_flight=in_flight)


def test_pool_measures_and_decides() -> None:
    pool = VersionPool()
    pool.replicas = [_replica(State.RUNNING, in_flight=1)]
    pool.took(100.0)
    pool.waiting = 2
    assert pool.wants_start(100.0) == (False, pytest.approx(DEFAULT_START_MS / 2 / 1000 + 0.001))
    pool.note_infer(30.0)
    pool.note_start(120.0)  # measured: a start here costs 120 ms; two waiters x 30 ms do not outlast it
    pays, due_s = pool.wants_start(100.0)
    assert not pays and due_s == pytest.approx(60.0 / 1000 + 0.001)  # once the running one has run 60 ms
    assert pool.wants_start(100.07) == (True, None)  # the running request has run 70 ms: the queue is slow
    pool.note_infer(80.0)
    assert pool.infer_ms == pytest.approx(40.0)  # a moving average
    pool.released(100.0)  # nothing in flight: no time-based wake-up, and 2 x 40 ms < 120 ms
    assert pool.wants_start(100.0) == (False, None)
    pool.note_infer(200.0)
    assert pool.wants_start(100.0) == (True, None)  # 2 x 72 ms >= 120 ms


def test_pool_with_no_replica_starts_at_once_and_then_waits_for_it() -> None:
    pool = VersionPool()
    pool.waiting = 3
    assert pool.wants_start(0.0) == (True, None)
    pool.replicas = [_replica(State.STARTING)]
    assert pool.wants_start(0.0) == (False, None)


def test_a_queue_that_stands_as_long_as_a_start_earns_one_even_of_fast_requests() -> None:
    """A fast model under a load one replica cannot keep up with: each waiter waits little, but the queue
    never empties; once it has stood a start's time a start pays, and the next one must earn its own."""
    pool = VersionPool()
    pool.replicas = [_replica(State.RUNNING, in_flight=1)]
    pool.note_infer(0.2)
    pool.note_start(300.0)
    pool.waiting = 30  # 30 x 0.2 ms: far shorter than a start

    def at(t: float) -> tuple[bool, float | None]:
        pool.released(t)
        pool.took(t)  # requests keep completing: the one in flight is always fresh
        return pool.wants_start(t)

    assert at(10.0)[0] is False
    assert at(10.2)[0] is False
    assert at(10.3) == (True, None)  # the queue has stood 300 ms
    assert at(10.31)[0] is False, "the clock starts again after a start"
    assert at(10.61) == (True, None)
    pool.waiting = 0
    pool.queue_gone()
    pool.waiting = 30
    assert at(10.7)[0] is False, "a queue that formed again starts from nothing"


def test_waiting_for_a_replica_being_started_is_not_a_standing_queue() -> None:
    pool = VersionPool()
    pool.replicas = [_replica(State.STARTING)]
    pool.waiting = 5
    assert pool.wants_start(0.0) == (False, None)
    pool.replicas = [_replica(State.RUNNING)]  # up at 0.5 s: the queue's clock starts now, not at 0
    assert pool.wants_start(0.5)[0] is False
    assert pool.queued_since == 0.5


@pytest.mark.parametrize(("queued_ms", "pays"), [(0.0, False), (299.0, False), (300.0, True)])
def test_start_pays_on_a_standing_queue(queued_ms: float, pays: bool) -> None:
    assert start_pays(30, 0, 1, 0.2, 300.0, queued_ms=queued_ms) is pays


# ---- the simulator mirrors the rule ------------------------------------------------------------


def _fleet() -> sim.Fleet:
    cfg = sim.Config(models=4, hosts=2, max_replicas=8, cores=4)
    return sim.new_fleet(cfg, sim.make_models(cfg, random.Random(1)))


def _req(i: int, at: float, model: int = 0) -> sim.Request:
    return sim.Request(arrival=sim.Arrival(i, at, model, 20.0))


def test_sim_proxy_waits_for_its_first_start_and_for_a_busy_replica() -> None:
    fleet = _fleet()
    host = fleet.hosts[0]
    for i in range(4):  # a burst of a new version: one start, the others wait for it
        sim.admit(fleet, host, _req(i, float(i)), now=float(i))
    assert fleet.counters.cold_starts == 1
    pool = host.pools[0]
    replica = pool.replicas[0]
    sim.on_ready(fleet, (host, replica), now=340.0)
    assert pool.start_ms == 340.0 and fleet.counters.cold_starts == 1  # 3 waiting x ~0 ms measured: wait
    sim.admit(fleet, host, _req(9, 341.0), now=341.0)
    assert fleet.counters.cold_starts == 1


def test_sim_proxy_starts_another_once_the_queue_outlasts_a_start() -> None:
    fleet = _fleet()
    host = fleet.hosts[0]
    pool = host.pool(0)
    replica = sim.Replica(uid="r", model=0, memory_mb=512, state=sim.RUNNING, last_used=0.0)
    host.replicas[replica.uid] = replica
    pool.replicas.append(replica)
    pool.infer_ms, pool.start_ms = 20.0, 340.0
    for i in range(17):  # one runs, 16 wait: 16 x 20 ms < 340 ms
        sim.admit(fleet, host, _req(i, 0.0), now=0.0)
    assert fleet.counters.cold_starts == 0 and len(pool.waiters) == 16
    assert pool.recheck_ms is not None and math.isclose(pool.recheck_ms, 340.0 / 16, rel_tol=1e-3)
    sim.admit(fleet, host, _req(17, 0.0), now=0.0)  # 17 waiting x 20 ms = 340 ms
    assert fleet.counters.cold_starts == 1


def test_sim_and_proxy_decide_alike() -> None:
    """The simulator's pool and the proxy's VersionPool give the same answer on the same state."""
    for waiting, coming, running, infer_ms, oldest_ms in [(3, 0, 1, 20.0, 5.0), (20, 1, 1, 20.0, 5.0),
                                                        (2, 0, 1, 5.0, 290.0), (1, 0, 0, 0.0, 0.0)]:
        proxy_pool = VersionPool()
        proxy_pool.replicas = [_replica(State.STARTING) for _ in range(coming)] + \
            [_replica(State.RUNNING, in_flight=1) for _ in range(running)]
        proxy_pool.waiting, proxy_pool.infer_ms, proxy_pool.start_ms = waiting, infer_ms, 300.0
        if running:
            proxy_pool.took(1000.0 - oldest_ms / 1000)
        sim_pool = sim.Pool(infer_ms=infer_ms, start_ms=300.0)
        sim_pool.replicas = [dataclasses.replace(sim.Replica("s", 0, 1, sim.STARTING, 0.0)) for _ in range(coming)] + \
            [sim.Replica("r", 0, 1, sim.RUNNING, 0.0, in_flight=1, taken_ms=1e6 - oldest_ms) for _ in range(running)]
        sim_pool.waiters.extend(_req(i, 0.0) for i in range(waiting))
        assert proxy_pool.wants_start(1000.0)[0] is sim_pool.wants_start(1e6)[0]


async def test_a_pulse_wakes_every_task_waiting_at_that_moment_and_no_later_one() -> None:
    pulse = Pulse()
    woken: list[int] = []

    async def waiter(n: int) -> None:
        await pulse.wait(timeout_s=5.0)
        woken.append(n)

    tasks = [asyncio.create_task(waiter(n)) for n in range(3)]
    await asyncio.sleep(0)  # all three waiting
    pulse.fire()
    await asyncio.wait_for(asyncio.gather(*tasks), 5.0)
    assert sorted(woken) == [0, 1, 2]
    pulse.fire()  # nobody waits: nothing kept for the next waiter
    t0 = time.monotonic()
    await pulse.wait(timeout_s=0.05)  # returns at its bound, not at once
    assert time.monotonic() - t0 >= 0.05
