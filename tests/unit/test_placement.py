"""Placement: which proxies get new replicas of a version, a pure function of the heartbeats."""
from __future__ import annotations

from typing import Any

import pytest

from ingress.placement import Needs, Placement, place_replicas
from ingress.router import GpuState, ProxyState, ReplicaState

V = "acme/churn/main/3"
OTHER = "acme/churn/main/2"
STRANGER = "globex/m/main/1"
NOW = 1000.0
CPU = Needs(version=V, memory_mb=1024, cpus=1.0, image="img")


def rep(state: str = "running", version: str = V, in_flight: int = 0, memory_mb: int = 1024,
        cpus: float = 1.0) -> ReplicaState:
    return ReplicaState(version=version, state=state, in_flight=in_flight, concurrency=1, memory_mb=memory_mb,
                        cpus=cpus)


def host(pid: str, *replicas: ReplicaState, cpus: float = 8, memory_mb: int = 32_768, available_mb: int = 30_000,
         budget_mb: int = 24_576, max_replicas: int = 16, per_customer: int = 0, gpus: tuple[GpuState, ...] = (),
         images: tuple[str, ...] = ("img",), ts: float = NOW, load1: float = 0.0) -> ProxyState:
    return ProxyState(proxy_id=pid, url=f"http://{pid}:8081", epoch=1, ts=ts, replicas=tuple(replicas),
                      max_replicas=max_replicas, images=frozenset(images), cpus=cpus, load1=load1,
                      memory_mb=memory_mb, memory_available_mb=available_mb, memory_budget_mb=budget_mb,
                      max_replicas_per_customer=per_customer, gpus=gpus)


def others(n: int, state: str = "running", version: str = OTHER, **kw: Any) -> tuple[ReplicaState, ...]:
    return tuple(rep(state, version=version, **kw) for _ in range(n))


def place(proxies: list[ProxyState], wake: int = 0, start: int = 0, spread: bool = False,
          needs: Needs = CPU, **kw: Any) -> list[tuple[str, int, int, int]]:
    return [(p.proxy_id, p.replicas, p.wake, p.start)
            for p in place_replicas(proxies, needs, wake, start, spread, NOW, **kw)]


# ---- waking lukewarm replicas ------------------------------------------------------------------

@pytest.mark.parametrize(
    ("proxies", "wake", "expected"),
    [
        # paused (frozen, ~20 ms) before stopped (a process start)
        ([host("a", rep("stopped")), host("b", rep("paused"))], 1, [("b", 1, 1, 0)]),
        # where the version runs least
        ([host("a", rep("paused"), rep("running")), host("b", rep("paused"))], 1, [("b", 1, 1, 0)]),
        # the proxy is asked for its running ones plus the woken ones
        ([host("a", rep("running"), rep("running"), rep("paused"), rep("paused"))], 2, [("a", 4, 2, 0)]),
        ([host("a", rep("paused")), host("b", rep("paused"), rep("stopped"))], 3,
         [("a", 1, 1, 0), ("b", 2, 2, 0)]),
        # never more than there are: the rest is for the caller to start
        ([host("a", rep("paused"))], 3, [("a", 1, 1, 0)]),
        ([host("a", rep("running"))], 1, []),
        # an excluded or silent proxy is not asked
        ([host("a", rep("paused"), ts=NOW - 60), host("b", rep("paused"))], 2, [("b", 1, 1, 0)]),
    ],
)
def test_wake(proxies: list[ProxyState], wake: int, expected: list[tuple[str, int, int, int]]) -> None:
    assert place(proxies, wake=wake) == expected


def test_wake_skips_excluded() -> None:
    assert place([host("a", rep("paused")), host("b", rep("paused"))], wake=2, exclude=frozenset({"a"})) == \
        [("b", 1, 1, 0)]


def test_wake_then_start() -> None:
    proxies = [host("a", rep("paused")), host("b")]
    assert place(proxies, wake=1, start=1) == [("a", 1, 1, 0), ("b", 1, 0, 1)]


# ---- starting new ones: where the room is ------------------------------------------------------

@pytest.mark.parametrize(
    ("proxies", "start", "spread", "expected"),
    [
        # the most room left (the scarcest resource as a share of the host)
        ([host("a", *others(6)), host("b", *others(1))], 1, False, [("b", 1, 0, 1)]),
        ([host("a", memory_mb=8192, budget_mb=6144), host("b")], 1, False, [("b", 1, 0, 1)]),
        ([host("a", load1=7.5), host("b", load1=0.5)], 1, False, [("b", 1, 0, 1)]),  # measured CPU load counts
        # similar hosts share the starts
        ([host("a"), host("b")], 2, False, [("a", 1, 0, 1), ("b", 1, 0, 1)]),
        # several on one host when that is where the room is
        ([host("big", cpus=64, memory_mb=262_144, available_mb=250_000, budget_mb=196_608),
          host("small", *others(1), cpus=2, memory_mb=4096, available_mb=3000, budget_mb=3072)], 3, False,
         [("big", 3, 0, 3)]),
        # spread (capacity.min >= 2): a host without the version beats a roomier one with it
        ([host("a", *others(4)), host("b", rep("running"))], 1, True, [("a", 1, 0, 1)]),
        ([host("a", *others(4)), host("b", rep("paused"))], 1, True, [("a", 1, 0, 1)]),  # lukewarm counts too
        ([host("a", *others(4)), host("b", rep("running"))], 1, False, [("b", 2, 0, 1)]),
        ([host("a"), host("b"), host("c")], 3, True, [("a", 1, 0, 1), ("b", 1, 0, 1), ("c", 1, 0, 1)]),
        # spread is a preference: with one host, it takes them all
        ([host("a")], 2, True, [("a", 2, 0, 2)]),
        # the image on disk (no pull) beats more room
        ([host("a", *others(4), images=("img",)), host("b", images=())], 1, False, [("a", 1, 0, 1)]),
        # a CPU model stays off GPU hosts while others have room
        ([host("gpu", gpus=(GpuState("g0", 81_559, 0),)), host("cpu", *others(3))], 1, False,
         [("cpu", 1, 0, 1)]),
    ],
)
def test_start_where_the_room_is(proxies: list[ProxyState], start: int, spread: bool,
                                 expected: list[tuple[str, int, int, int]]) -> None:
    assert place(proxies, start=start, spread=spread) == expected


@pytest.mark.parametrize(
    "full",
    [
        host("x", *others(16)),                                      # replica slots
        host("x", *others(8), per_customer=8),                      # the customer's quota there
        host("x", *others(4), max_replicas=8),                      # default quota: half the slots
        host("x", *others(8, cpus=1.0), cpus=8),                    # CPUs of running replicas
        host("x", *others(3, memory_mb=8192)),                      # the memory budget
        host("x", available_mb=512),                                # what the host has free now
        host("x", budget_mb=0, memory_mb=1024),                     # budget not reported: 3/4 of RAM
    ],
)
def test_a_host_without_room_is_skipped(full: ProxyState) -> None:
    assert place([full], start=1) == []
    assert place([full, host("y", *others(2))], start=2) == [("y", 2, 0, 2)]


def test_what_a_proxy_does_not_report_is_not_judged() -> None:
    bare = ProxyState(proxy_id="old", url="http://old:8081", epoch=1, ts=NOW, replicas=others(3))
    assert place([bare], start=2) == [("old", 2, 0, 2)]


def test_paused_replicas_use_no_cpu() -> None:
    assert place([host("x", *others(8, state="paused"), cpus=8)], start=1) == [("x", 1, 0, 1)]


def test_room_after_evicting_idle_paused_replicas_of_others_comes_last() -> None:
    crowded = host("crowded", *others(16, state="paused", version=STRANGER))
    assert place([crowded], start=1) == [("crowded", 1, 0, 1)]
    assert place([crowded, host("roomy", *others(6))], start=1) == [("roomy", 1, 0, 1)]
    # busy replicas are not evictable
    assert place([host("busy", *others(16, state="paused", version=STRANGER, in_flight=1))], start=1) == []
    # nor is memory of running ones
    assert place([host("x", *others(3, memory_mb=8192, version=STRANGER))], start=1) == []


def test_a_host_where_the_version_sleeps_is_asked_for_those_too() -> None:
    """The proxy wakes its lukewarm replicas before starting new ones: asked for one more than it
    runs, it would only wake the sleeping one and the fleet would gain no ready replica."""
    assert place([host("a", rep("running"), rep("paused"))], start=1) == [("a", 3, 0, 1)]
    # elsewhere first, when there is an elsewhere
    assert place([host("a", rep("paused")), host("b", *others(4))], start=1) == [("b", 1, 0, 1)]


def test_a_version_never_exceeds_its_per_host_cap() -> None:
    needs = Needs(version=V, memory_mb=512, cpus=0.5, max_per_host=2)
    assert place([host("a", rep("running"))], start=3, needs=needs) == [("a", 2, 0, 1)]


def test_excluded_and_silent_proxies_get_nothing() -> None:
    proxies = [host("a"), host("b", ts=NOW - 16), host("c")]
    assert place(proxies, start=2, exclude=frozenset({"c"})) == [("a", 2, 0, 2)]


# ---- GPU models ------------------------------------------------------------------------------

GPU = Needs(version=V, memory_mb=4096, cpus=1.0, gpu=True, gpu_memory_mb=16_000, image="img", max_per_host=1)


def gpu(uuid: str, total_mb: int, used_mb: int = 0, version: str | None = None, swapping: bool = False) -> GpuState:
    return GpuState(uuid=uuid, memory_total_mb=total_mb, memory_used_mb=used_mb, version=version, swapping=swapping)


@pytest.mark.parametrize(
    ("proxies", "expected"),
    [
        ([host("cpu")], []),  # no GPU at all
        # the tightest free GPU that fits: the 80 GB one stays for a big model
        ([host("h100", gpus=(gpu("a", 81_559),)), host("l4", gpus=(gpu("b", 23_034),))], [("l4", 1, 0, 1)]),
        ([host("small", gpus=(gpu("a", 8_192),)), host("h100", gpus=(gpu("b", 81_559),))], [("h100", 1, 0, 1)]),
        ([host("used", gpus=(gpu("a", 23_034, used_mb=20_000),))], []),  # not enough free memory on it
        ([host("swapping", gpus=(gpu("a", 81_559, swapping=True),))], []),
        # held by an idle version: free after a swap, but only when no free GPU is elsewhere
        ([host("held", rep("running", version=OTHER), gpus=(gpu("a", 81_559, used_mb=30_000, version=OTHER),))],
         [("held", 1, 0, 1)]),
        ([host("held", rep("running", version=OTHER), gpus=(gpu("a", 23_034, version=OTHER),)),
          host("free", gpus=(gpu("b", 81_559),))], [("free", 1, 0, 1)]),
        # held by a busy version: not a candidate
        ([host("busy", rep("running", version=OTHER, in_flight=1), gpus=(gpu("a", 81_559, version=OTHER),))], []),
        # NVML figures unknown yet: a free GPU is taken as fitting
        ([host("unknown", gpus=(gpu("a", 0),))], [("unknown", 1, 0, 1)]),
    ],
)
def test_gpu_models(proxies: list[ProxyState], expected: list[tuple[str, int, int, int]]) -> None:
    assert place(proxies, start=1, needs=GPU) == expected


def test_one_gpu_model_per_gpu_and_one_replica_per_host() -> None:
    two_gpus = host("two", gpus=(gpu("a", 81_559), gpu("b", 81_559)))
    assert place([two_gpus], start=2, needs=GPU) == [("two", 1, 0, 1)]  # the proxy runs one per version
    assert place([two_gpus, host("one", gpus=(gpu("c", 81_559),))], start=2, needs=GPU) == \
        [("one", 1, 0, 1), ("two", 1, 0, 1)]


# ---- the heartbeat fields placement reads -----------------------------------------------------

def test_from_heartbeat_reads_what_placement_needs() -> None:
    beat = {
        "proxy_id": "h", "url": "http://h:8081", "epoch": 2, "ts": 5.0,
        "capacity": {"max_replicas": 8, "replica_concurrency": 2, "cpus": 16, "load1": 1.5, "memory_mb": 64_000,
                     "memory_available_mb": 50_000, "memory_budget_mb": 48_000, "max_replicas_per_customer": 4},
        "replicas": [{"version": V, "state": "running", "in_flight": 1, "concurrency": 2, "memory_mb": 2048,
                      "cpus": 0.5, "gpu": True}],
        "gpus": [{"uuid": "GPU-1", "memory_total_mb": 81_559, "memory_used_mb": 10, "version": V, "swapping": False},
                 {"uuid": "GPU-2", "memory_total_mb": None, "memory_used_mb": None, "version": None}],
        "waiting": {V: 3, OTHER: 0},
    }
    state = ProxyState.from_heartbeat(beat)
    assert (state.cpus, state.load1, state.memory_mb, state.memory_available_mb, state.memory_budget_mb,
            state.max_replicas_per_customer) == (16.0, 1.5, 64_000, 50_000, 48_000, 4)
    [replica] = state.replicas
    assert (replica.memory_mb, replica.cpus, replica.gpu) == (2048, 0.5, True)
    assert state.gpus == (GpuState("GPU-1", 81_559, 10, V, False), GpuState("GPU-2", 0, 0, None, False))
    assert state.waiting == ((V, 3),)


def test_from_heartbeat_without_the_new_fields_gives_defaults() -> None:
    state = ProxyState.from_heartbeat({"proxy_id": "p", "url": "u", "replicas": [{"version": V, "state": "paused"}]})
    assert (state.cpus, state.memory_budget_mb, state.gpus, state.waiting) == (0.0, 0, (), ())
    assert (state.replicas[0].memory_mb, state.replicas[0].cpus) == (0, 1.0)


def test_placements_are_plain_data() -> None:
    [p] = place_replicas([host("a")], CPU, 0, 1, False, NOW)
    assert p == Placement("a", "http://a:8081", 1, wake=0, start=1)
