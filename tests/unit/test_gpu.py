"""GPU occupancy: the pure choice from a table, and the coordinator's swaps over a fake NVML.

Time is a fake clock whose ``sleep`` moves it, so waiting for a release
"for 30 s" takes microseconds; two tests use the real clock with short times.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from runtime_proxy.gpu import (
    EVICT, TAKE, USE, WAIT, Decision, GpuBusy, GpuCoordinator, GpuSlot, NoGpuAvailable, choose_gpu,
)
from runtime_proxy.nvml import FakeNvml, NoGpu, RealNvml

pytestmark = pytest.mark.timeout(10)

NOW = 1000.0
A, B, C = "acme/churn/main/1", "acme/churn/main/2", "beta/vision/main/7"
CA, CB, CC = "a" * 64, "b" * 64, "c" * 64


# ---- the pure choice ------------------------------------------------------------------


def slot(uuid: str, version: str | None = None, container: str | None = "x" * 64, *, since: float = 0.0,
         in_flight: int = 0, last_used: float | None = None) -> GpuSlot:
    return GpuSlot(uuid, version, container if version else None, since, in_flight, last_used)


def draining(uuid: str) -> GpuSlot:
    return GpuSlot(uuid, None, "d" * 64, 0.0, 0)


@pytest.mark.parametrize(
    ("slots", "expected"),
    [
        ([], Decision(WAIT)),
        ([slot("g0")], Decision(TAKE, "g0")),
        ([slot("g0", B), slot("g1")], Decision(TAKE, "g1")),
        ([slot("g0", B), slot("g1", A, in_flight=3)], Decision(USE, "g1")),  # its own GPU, busy or not
        ([slot("g0", A, since=NOW)], Decision(USE, "g0")),  # residency does not matter for the holder
        ([slot("g0"), slot("g1", A)], Decision(USE, "g1")),
        ([draining("g0"), slot("g1")], Decision(TAKE, "g1")),  # a GPU already drained first
        ([draining("g0"), slot("g1", B)], Decision(TAKE, "g0")),  # a draining one beats an eviction
        # eviction: idle, resident long enough, least recently used first
        ([slot("g0", B, last_used=NOW - 5), slot("g1", C, last_used=NOW - 50)], Decision(EVICT, "g1")),
        ([slot("g0", B, since=10.0), slot("g1", C, since=20.0)], Decision(EVICT, "g0")),  # no use: oldest
        ([slot("g0", B, since=20.0, last_used=NOW - 1), slot("g1", C, since=10.0, last_used=NOW - 1)],
         Decision(EVICT, "g1")),  # same last use: longest resident
        ([slot("g0", B, last_used=NOW - 100, in_flight=1), slot("g1", C, last_used=NOW - 1)],
         Decision(EVICT, "g1")),  # busy holders are never evicted
        ([slot("g0", B, since=NOW - 30)], Decision(EVICT, "g0")),  # exactly the minimum residency
        # waiting
        ([slot("g0", B, since=NOW - 29)], Decision(WAIT, ready_at=NOW + 1)),
        ([slot("g0", B, since=NOW - 10), slot("g1", C, since=NOW - 20)], Decision(WAIT, ready_at=NOW + 10)),
        ([slot("g0", B, in_flight=1), slot("g1", C, since=NOW - 25)], Decision(WAIT, ready_at=NOW + 5)),
        ([slot("g0", B, in_flight=1), slot("g1", C, in_flight=2)], Decision(WAIT)),  # no time known
    ],
)
def test_choose_gpu(slots: list[GpuSlot], expected: Decision) -> None:
    assert choose_gpu(slots, A, NOW, min_residency_s=30.0) == expected


# ---- the coordinator ----------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


class Host:
    """The replica manager's side: containers on GPUs, and what stop/kill do to their memory."""

    def __init__(self, nvml: FakeNvml, clock: Any, *, release_after_s: float = 0.0, memory_lag_s: float = 0.0,
                 never: bool = False, kill_works: bool = True) -> None:
        self.nvml, self.clock = nvml, clock
        self.release_after_s, self.memory_lag_s, self.never, self.kill_works = (
            release_after_s, memory_lag_s, never, kill_works)
        self.events: list[tuple[str, str, float]] = []

    async def stop(self, container: str) -> None:
        self.events.append(("stop", container, self.clock()))
        self.nvml.detach(container, self.release_after_s, never=self.never, memory_lag_s=self.memory_lag_s)

    async def kill(self, container: str) -> None:
        self.events.append(("kill", container, self.clock()))
        if self.kill_works:
            self.nvml.detach(container)

    async def run(self, coord: GpuCoordinator, version: str, container: str, deadline: float, mb: int = 20_000) -> str:
        """acquire, then "create" the container on the GPU the way the manager would."""
        uuid = await coord.acquire(version, deadline, self.stop, self.kill)
        self.events.append(("start", container, self.clock()))
        coord.note_container(version, container)
        self.nvml.attach(uuid, container, mb)
        return uuid


# Bounds a wait that would hang if a time bound under test failed; the work itself takes milliseconds.
WAIT_S = 5.0


def setup(gpus: int = 1, *, clock: Any = None, **kw: Any) -> tuple[GpuCoordinator, FakeNvml, Any]:
    clock = clock or FakeClock()
    nvml = FakeNvml(gpus, clock=clock, baseline_mb=300)
    options: dict[str, Any] = {
        "min_residency_s": 0.0, "release_timeout_s": 5.0, "poll_s": 0.1, "kill_grace_s": 1.0,
        "sleep": clock.sleep if isinstance(clock, FakeClock) else asyncio.sleep,
    }
    return GpuCoordinator(nvml, clock, **(options | kw)), nvml, clock


async def nothing(container: str) -> None:
    raise AssertionError(f"nothing to stop or kill, yet asked for {container}")


async def uuids(nvml: FakeNvml) -> list[str]:
    return [g.uuid for g in await nvml.gpus()]


async def test_free_gpu_is_taken_and_the_same_version_reuses_it() -> None:
    coord, nvml, clock = setup(2)
    host = Host(nvml, clock)
    g0, g1 = await uuids(nvml)
    assert await host.run(coord, A, CA, NOW + 30) == g0
    assert await host.run(coord, B, CB, NOW + 30) == g1  # the other free GPU, nobody evicted
    assert await coord.acquire(A, NOW + 30, host.stop, host.kill) == g0
    assert [e[0] for e in host.events] == ["start", "start"]
    assert coord.holder(g0) == A and coord.holder(g1) == B


async def test_swap_waits_for_a_slow_release_then_hands_the_gpu_over() -> None:
    coord, nvml, clock = setup(1, release_timeout_s=5.0)
    host = Host(nvml, clock, release_after_s=0.3, memory_lag_s=0.2)  # exits at 0.3 s, memory back at 0.5 s
    (g0,) = await uuids(nvml)
    await host.run(coord, A, CA, NOW + 30)
    assert await host.run(coord, B, CB, NOW + 30) == g0
    (_, _, t_stop), (_, _, t_start) = host.events[1:]
    assert [e[:2] for e in host.events] == [("start", CA), ("stop", CA), ("start", CB)]
    assert t_start - t_stop >= 0.5  # not before the memory was back, not only the process gone
    assert t_start - t_stop < 1.0
    assert coord.holder(g0) == B


async def test_swap_on_the_real_clock() -> None:
    coord, nvml, clock = setup(1, clock=time.monotonic, poll_s=0.02)
    host = Host(nvml, clock, release_after_s=0.2)
    (g0,) = await uuids(nvml)
    await host.run(coord, A, CA, time.monotonic() + 5)
    assert await host.run(coord, B, CB, time.monotonic() + 5) == g0
    # No kill: the release was seen when it came, well inside the 5 s release timeout.
    assert [e[:2] for e in host.events] == [("start", CA), ("stop", CA), ("start", CB)]
    (_, _, t_stop), (_, _, t_start) = host.events[1:]
    assert t_start - t_stop >= 0.2  # not before the memory was back (a lower bound: load only adds to it)


async def test_never_released_memory_is_killed_after_the_release_timeout() -> None:
    coord, nvml, clock = setup(1, release_timeout_s=3.0)
    host = Host(nvml, clock, never=True)
    await host.run(coord, A, CA, NOW + 60)
    await host.run(coord, B, CB, NOW + 60)
    stop, kill, start = host.events[1:]
    assert (stop[0], kill[0], start[0]) == ("stop", "kill", "start")
    assert kill[1] == CA and kill[2] - stop[2] >= 3.0
    assert start[2] - kill[2] < 1.0  # the kill worked: no need for the whole grace


async def test_unkillable_holder_is_given_up_on_after_the_kill_grace() -> None:
    coord, nvml, clock = setup(1, release_timeout_s=3.0, kill_grace_s=2.0)
    host = Host(nvml, clock, never=True, kill_works=False)
    await host.run(coord, A, CA, NOW + 60)
    await host.run(coord, B, CB, NOW + 60)
    _, stop, kill, start = host.events
    assert kill[2] - stop[2] >= 3.0 and start[2] - kill[2] >= 2.0


async def test_hanging_nvml_cannot_hang_a_swap() -> None:
    coord, nvml, clock = setup(1, release_timeout_s=1.0, kill_grace_s=0.5, poll_s=0.25, nvml_timeout_s=0.02)
    host = Host(nvml, clock)
    (g0,) = await uuids(nvml)
    await host.run(coord, A, CA, NOW + 60)
    nvml.hang = True
    # Every NVML call times out after 0.02 s; unbounded, the first one would never return.
    assert await asyncio.wait_for(host.run(coord, B, CB, NOW + 60), WAIT_S) == g0  # on the GPUs known before
    assert [e[0] for e in host.events] == ["start", "stop", "kill", "start"]  # never saw a release
    _, stop, kill, start = host.events
    # A timed-out call counts as "not released": the swap waited out the release timeout and kill grace.
    assert kill[2] - stop[2] >= 1.0 and start[2] - kill[2] >= 0.5


async def test_hanging_nvml_before_any_answer_is_busy_not_hung() -> None:
    coord, nvml, clock = setup(1, nvml_timeout_s=0.02)
    nvml.hang = True
    with pytest.raises(GpuBusy, match="GPU state unknown"):
        await asyncio.wait_for(coord.acquire(A, NOW + 60, nothing, nothing), WAIT_S)
    # Answered at once: one NVML call, no waiting on the clock for a state it cannot learn.
    assert nvml.calls == 1 and clock.now == NOW


async def test_hanging_stop_is_bounded() -> None:
    coord, nvml, clock = setup(1, holder_timeout_s=0.02)
    host = Host(nvml, clock)
    await host.run(coord, A, CA, NOW + 60)

    async def stuck(container: str) -> None:
        await asyncio.Event().wait()

    assert await coord.acquire(B, NOW + 60, stuck, host.kill)  # gave up on stop, killed, went on
    assert [e[0] for e in host.events] == ["start", "kill"]


async def test_min_residency_answers_busy_with_retry_after_when_the_deadline_is_sooner() -> None:
    coord, nvml, clock = setup(1, min_residency_s=30.0)
    host = Host(nvml, clock)
    await host.run(coord, A, CA, NOW + 60)
    clock.now += 5
    with pytest.raises(GpuBusy) as busy:
        await host.run(coord, B, CB, clock.now + 10)
    assert busy.value.status == 503 and busy.value.retry_after_s == pytest.approx(25.0)
    assert busy.value.headers == {"Retry-After": "25"}
    assert clock.now == NOW + 5  # answered at once, no waiting it could not finish
    assert [e[0] for e in host.events] == ["start"]


async def test_min_residency_waits_when_the_deadline_allows() -> None:
    coord, nvml, clock = setup(1, min_residency_s=30.0)
    host = Host(nvml, clock)
    await host.run(coord, A, CA, NOW + 60)
    await host.run(coord, B, CB, NOW + 60)
    stop = host.events[1]
    assert stop[0] == "stop" and stop[2] >= NOW + 30


async def test_busy_holder_is_not_evicted_and_the_request_gets_busy_at_its_deadline() -> None:
    coord, nvml, clock = setup(1, usage=lambda key: (1, None) if key == A else (0, None))
    host = Host(nvml, clock)
    await host.run(coord, A, CA, NOW + 60)
    with pytest.raises(GpuBusy, match="busy model") as busy:
        await host.run(coord, B, CB, NOW + 2)
    assert clock.now >= NOW + 2 and busy.value.headers == {"Retry-After": "1"}
    assert [e[0] for e in host.events] == ["start"]


async def test_least_recently_used_holder_is_evicted() -> None:
    last_used = {A: NOW + 50, B: NOW + 10}
    coord, nvml, clock = setup(2, usage=lambda key: (0, last_used.get(key)))
    host = Host(nvml, clock)
    g0, g1 = await uuids(nvml)
    await host.run(coord, A, CA, NOW + 60)
    await host.run(coord, B, CB, NOW + 60)
    assert await host.run(coord, C, CC, NOW + 60) == g1
    assert ("stop", CB) in [e[:2] for e in host.events] and coord.holder(g0) == A


async def test_deadline_during_a_swap_answers_busy_and_the_swap_goes_on() -> None:
    coord, nvml, clock = setup(1, clock=time.monotonic, poll_s=0.01, release_timeout_s=5.0)
    host = Host(nvml, clock, never=True)  # A's memory stays until the test lets it go
    (g0,) = await uuids(nvml)
    await host.run(coord, A, CA, time.monotonic() + 5)
    with pytest.raises(GpuBusy, match="still being freed"):
        await host.run(coord, B, CB, time.monotonic() + 0.05)
    with pytest.raises(GpuBusy):  # a third version may not jump into the GPU being freed
        await host.run(coord, C, CC, time.monotonic() + 0.05)
    freed_at = time.monotonic() + 0.1
    nvml.detach(CA, release_after_s=0.1)  # A's container exits at last
    assert await host.run(coord, B, CB, time.monotonic() + 5) == g0  # B's retry finds its swap and waits it out
    assert [e[:2] for e in host.events] == [("start", CA), ("stop", CA), ("start", CB)]  # one stop, no kill
    assert host.events[-1][2] >= freed_at  # B started only once A's memory was back


async def test_concurrent_requests_never_swap_twice() -> None:
    coord, nvml, clock = setup(1, release_timeout_s=5.0, min_residency_s=10.0)
    host = Host(nvml, clock, release_after_s=0.5)
    await host.run(coord, A, CA, NOW + 60)
    clock.now += 10
    deadline = clock.now + 3
    results = await asyncio.gather(
        host.run(coord, B, CB, deadline), host.run(coord, C, CC, deadline), return_exceptions=True)
    assert sum(isinstance(r, str) for r in results) == 1
    assert sum(isinstance(r, GpuBusy) for r in results) == 1
    assert [e[0] for e in host.events].count("stop") == 1


async def test_released_gpu_is_taken_once_its_memory_is_back() -> None:
    coord, nvml, clock = setup(1)
    host = Host(nvml, clock)
    (g0,) = await uuids(nvml)
    await host.run(coord, A, CA, NOW + 60)
    nvml.detach(CA, release_after_s=0.4)  # the manager retired A for idleness
    coord.release(A)
    assert coord.holder(g0) is None
    assert await host.run(coord, B, CB, NOW + 60) == g0
    assert host.events[-1][2] >= NOW + 0.4 and "stop" not in [e[0] for e in host.events]


async def test_gpu_reserved_but_never_claimed_is_freed_after_the_grace() -> None:
    coord, nvml, clock = setup(1, claim_grace_s=10.0)
    host = Host(nvml, clock)
    (g0,) = await uuids(nvml)
    assert await coord.acquire(A, NOW + 60, host.stop, host.kill) == g0  # its create failed, no release
    with pytest.raises(GpuBusy):
        await coord.acquire(B, NOW + 5, host.stop, host.kill)
    clock.now = NOW + 10
    assert await coord.acquire(B, NOW + 60, host.stop, host.kill) == g0
    assert host.events == []


async def test_no_gpu_raises_no_gpu_available() -> None:
    for nvml in (NoGpu(), RealNvml(), FakeNvml(0)):
        coord = GpuCoordinator(nvml, min_residency_s=0.0)
        with pytest.raises(NoGpuAvailable, match="this host has no GPU") as err:
            await coord.acquire(A, time.monotonic() + 5, nothing, nothing)
        assert err.value.status == 503 and err.value.type == "no_gpu"
        assert await coord.snapshot() == []


async def test_snapshot_shows_holders_and_memory_per_container() -> None:
    coord, nvml, clock = setup(2)
    host = Host(nvml, clock)
    g0, g1 = await uuids(nvml)
    await host.run(coord, A, CA, NOW + 60, mb=7_000)
    nvml.attach(g1, "e" * 64, 100)  # someone else's container
    clock.now += 12
    first, second = await coord.snapshot()
    assert first["uuid"] == g0 and first["version"] == A and first["container"] == CA
    assert first["memory_used_mb"] == 7_300 and first["memory_total_mb"] == 81_559
    assert first["containers"] == {CA: 7_000} and first["resident_s"] == 12.0 and first["stale"] is False
    assert second["version"] is None and second["containers"] == {"e" * 64: 100}
    nvml.hang = True
    coord.nvml.timeout_s = 0.02
    assert all(entry["stale"] for entry in await coord.snapshot())


async def test_adopted_holder_is_evicted_like_any_other() -> None:
    coord, nvml, clock = setup(1)
    host = Host(nvml, clock)
    (g0,) = await uuids(nvml)
    nvml.attach(g0, CA, 5_000)
    coord.adopt(A, g0, CA)  # found at start-up by Docker labels
    assert await host.run(coord, B, CB, NOW + 60) == g0
    assert [e[:2] for e in host.events] == [("stop", CA), ("start", CB)]


async def test_close_cancels_a_swap_in_progress() -> None:
    coord, nvml, clock = setup(1, clock=time.monotonic, poll_s=0.01)
    host = Host(nvml, clock, never=True)
    await host.run(coord, A, CA, time.monotonic() + 5)
    with pytest.raises(GpuBusy):
        await host.run(coord, B, CB, time.monotonic() + 0.02)
    await coord.close()
    assert (await coord.snapshot())[0]["swapping"] is False
