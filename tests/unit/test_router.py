"""Proxy choice: a pure function of (snapshot, version, now, rng)."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from ingress.router import (
    COLD, LUKEWARM, WARM, ProxyState, ReplicaState, StartCosts, alive, choose_proxies, tier_and_wait,
)
from runtime_proxy.heartbeat import Heartbeat
from runtime_proxy.lifecycle import State
from runtime_proxy.replicas import ReplicaManager
from shared.messages import ProxyHeartbeat, VersionSpec
from shared.settings import ProxySettings

V = "acme/churn/main/3"
OTHER = "acme/churn/main/2"
NOW = 1000.0
COSTS = StartCosts(lukewarm_ms=25.0, cold_ms=400.0, infer_ms=5.0)


def rep(state: str, in_flight: int = 0, concurrency: int = 1, version: str = V) -> ReplicaState:
    return ReplicaState(version=version, state=state, in_flight=in_flight, concurrency=concurrency)


def proxy(pid: str, *replicas: ReplicaState, ts: float = NOW, max_replicas: int = 16, epoch: int = 1,
          waiting: dict[str, int] | None = None) -> ProxyState:
    return ProxyState(proxy_id=pid, url=f"http://{pid}:8081", epoch=epoch, ts=ts, replicas=tuple(replicas),
                      max_replicas=max_replicas, waiting=tuple((waiting or {}).items()))


@pytest.mark.parametrize(
    ("replicas", "max_replicas", "tier", "ms"),
    [
        ((rep("running"),), 16, WARM, 0.0),
        ((rep("running", in_flight=1),), 16, WARM, 5.0),  # one ahead of us
        ((rep("running", in_flight=3),), 16, WARM, 15.0),
        ((rep("running", in_flight=3, concurrency=4),), 16, WARM, 0.0),  # a free slot
        ((rep("running", in_flight=4, concurrency=4),), 16, WARM, 1.25),
        ((rep("running", in_flight=5), rep("running", in_flight=0)), 16, WARM, 0.0),  # least loaded replica
        ((rep("running", in_flight=9), rep("paused")), 16, WARM, 45.0),
        ((rep("paused"),), 16, LUKEWARM, 25.0),
        ((rep("stopped"),), 16, LUKEWARM, 320.0),  # a boot and a load, not a thaw
        ((rep("stopped"), rep("paused")), 16, LUKEWARM, 25.0),  # the paused one is thawed
        ((rep("starting"),), 16, COLD, 200.0),  # a start under way: half of it left on average
        ((), 16, COLD, 400.0),
        ((rep("running", version=OTHER),), 16, COLD, 400.0),
        ((rep("running", in_flight=2, version=OTHER),), 16, COLD, 410.0),  # a busy host costs a cold start more
        ((rep("paused", version=OTHER), rep("paused", version="x")), 2, COLD, 800.0),  # full host: evict first
        ((rep("paused", version=OTHER),), 2, COLD, 400.0),
    ],
)
def test_tier_and_wait(replicas: tuple[ReplicaState, ...], max_replicas: int, tier: str, ms: float) -> None:
    assert tier_and_wait(proxy("p", *replicas, max_replicas=max_replicas), V, COSTS) == (tier, ms)


@pytest.mark.parametrize(
    ("proxies", "expected_order"),
    [
        # warm beats paused beats cold, whatever the input order
        ([proxy("cold"), proxy("paused", rep("paused")), proxy("warm", rep("running"))], ["warm", "paused", "cold"]),
        ([proxy("paused", rep("paused")), proxy("stopped-other", rep("stopped", version=OTHER))], ["paused", "stopped-other"]),
        # idle warm beats busy warm; a very busy warm replica loses even to a paused one
        ([proxy("busy", rep("running", in_flight=2)), proxy("idle", rep("running"))], ["idle", "busy"]),
        ([proxy("swamped", rep("running", in_flight=10)), proxy("paused", rep("paused"))], ["paused", "swamped"]),
        # but a stopped replica is a boot away: a warm one with a short queue goes first, a paused one too
        ([proxy("stopped", rep("stopped")), proxy("queued", rep("running", in_flight=10))], ["queued", "stopped"]),
        ([proxy("stopped", rep("stopped")), proxy("paused", rep("paused"))], ["paused", "stopped"]),
        # cold on a loaded host is worse than cold on an idle one
        ([proxy("loaded", rep("running", in_flight=3, version=OTHER)), proxy("empty")], ["empty", "loaded"]),
    ],
)
def test_choose_proxies_ranking(proxies: list[ProxyState], expected_order: list[str]) -> None:
    for seed in range(20):
        chosen = choose_proxies(proxies, V, NOW, random.Random(seed), COSTS)
        assert [c.proxy.proxy_id for c in chosen] == expected_order


def test_choose_proxies_reports_tier_and_expected_ms() -> None:
    chosen = choose_proxies([proxy("a", rep("paused")), proxy("b", rep("running"))], V, NOW, random.Random(0), COSTS)
    assert [(c.tier, c.expected_ms) for c in chosen] == [(WARM, 0.0), (LUKEWARM, 25.0)]


@pytest.mark.parametrize(
    ("ts", "max_age_s", "kept"),
    [
        (NOW, 15.0, True),
        (NOW - 15.0, 15.0, True),  # exactly at the limit is still alive
        (NOW - 15.01, 15.0, False),
        (NOW - 100.0, 15.0, False),
        (NOW - 100.0, 200.0, True),
        (0.0, 15.0, False),
    ],
)
def test_stale_heartbeat_excluded(ts: float, max_age_s: float, kept: bool) -> None:
    stale = proxy("old", rep("running"), ts=ts)
    fresh = proxy("new", rep("paused"))
    ids = [c.proxy.proxy_id for c in choose_proxies([stale, fresh], V, NOW, random.Random(1), COSTS, max_age_s)]
    assert ids == (["old", "new"] if kept else ["new"])
    assert (stale in alive([stale, fresh], NOW, max_age_s)) is kept


@pytest.mark.parametrize(
    ("exclude", "expected"),
    [
        (frozenset(), ["warm", "paused", "cold"]),
        (frozenset({"warm"}), ["paused", "cold"]),
        (frozenset({"warm", "paused"}), ["cold"]),
        (frozenset({"warm", "paused", "cold"}), []),
        (frozenset({"unknown"}), ["warm", "paused", "cold"]),
    ],
)
def test_exclude_honoured(exclude: frozenset[str], expected: list[str]) -> None:
    proxies = [proxy("cold"), proxy("paused", rep("paused")), proxy("warm", rep("running"))]
    chosen = choose_proxies(proxies, V, NOW, random.Random(0), COSTS, exclude=exclude)
    assert [c.proxy.proxy_id for c in chosen] == expected


def test_no_proxies_no_choices() -> None:
    assert choose_proxies([], V, NOW, random.Random(0)) == []


def test_equal_proxies_both_get_picked_first_across_seeds() -> None:
    proxies = [proxy("a", rep("running")), proxy("b", rep("running"))]
    firsts = {choose_proxies(proxies, V, NOW, random.Random(seed), COSTS)[0].proxy.proxy_id for seed in range(50)}
    assert firsts == {"a", "b"}


def test_same_seed_same_order() -> None:
    proxies = [proxy(str(i), rep("running")) for i in range(6)]
    order = lambda seed: [c.proxy.proxy_id for c in choose_proxies(proxies, V, NOW, random.Random(seed), COSTS)]
    assert order(7) == order(7)
    assert sorted(order(7)) == [str(i) for i in range(6)]


def test_lighter_loaded_equal_proxy_wins_more_often() -> None:
    # All three are idle-warm for V (same expected latency); "light" runs nothing else,
    # the other two are busy with another version.
    proxies = [
        proxy("heavy1", rep("running"), rep("running", in_flight=4, version=OTHER)),
        proxy("light", rep("running")),
        proxy("heavy2", rep("running"), rep("running", in_flight=4, version=OTHER)),
    ]
    wins = {"heavy1": 0, "light": 0, "heavy2": 0}
    for seed in range(300):
        chosen = choose_proxies(proxies, V, NOW, random.Random(seed), COSTS)
        assert {c.expected_ms for c in chosen} == {0.0}
        wins[chosen[0].proxy.proxy_id] += 1
    # power of two: the light one is first unless both heavy ones are sampled (1/3 of draws)
    assert wins["light"] > 150
    assert wins["light"] > 2 * max(wins["heavy1"], wins["heavy2"])
    assert wins["heavy1"] > 0 and wins["heavy2"] > 0


def test_two_equal_latency_proxies_lighter_always_first() -> None:
    proxies = [proxy("heavy", rep("running"), rep("running", in_flight=2, version=OTHER)), proxy("light", rep("running"))]
    for seed in range(30):
        assert choose_proxies(proxies, V, NOW, random.Random(seed), COSTS)[0].proxy.proxy_id == "light"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"proxy_id": "h1", "url": "http://h1:8081", "epoch": 3, "ts": 12.5,
             "capacity": {"max_replicas": 4, "cpus": 8},
             "replicas": [{"version": V, "state": "paused", "in_flight": 0, "concurrency": 2, "idle_s": 3.0}],
             "images": ["img:a", "img:b"]},
            ProxyState(proxy_id="h1", url="http://h1:8081", epoch=3, ts=12.5,
                       replicas=(ReplicaState(V, "paused", 0, 2),), max_replicas=4,
                       images=frozenset({"img:a", "img:b"})),
        ),
        (
            {"proxy_id": 7, "url": "http://x"},
            ProxyState(proxy_id="7", url="http://x", epoch=0, ts=0.0),
        ),
        (
            {"proxy_id": "p", "url": "u", "replicas": [{"version": V, "state": "running"}], "capacity": None},
            ProxyState(proxy_id="p", url="u", epoch=0, ts=0.0, replicas=(ReplicaState(V, "running", 0, 1),)),
        ),
    ],
)
def test_from_heartbeat(data: dict[str, Any], expected: ProxyState) -> None:
    assert ProxyState.from_heartbeat(data) == expected


@pytest.mark.parametrize(
    "data",
    [
        {"url": "u"},
        {"proxy_id": "p"},
        {"proxy_id": "p", "url": "u", "replicas": [{"state": "running"}]},
        {"proxy_id": "p", "url": "u", "epoch": "x"},
        {"proxy_id": "p", "url": "u", "replicas": [{"version": V}]},
        {"proxy_id": "p", "url": "u", "replicas": ["not a replica"]},
        {"proxy_id": "p", "url": "u", "replicas": [{"version": V, "state": "running", "in_flight": "many"}]},
        {"proxy_id": "p", "url": "u", "replicas": [{"version": V, "state": "running", "cpus": [1]}]},
    ],
)
def test_from_heartbeat_rejects_broken(data: dict[str, Any]) -> None:
    """As the heartbeat's own parse does (the view skips what either refuses)."""
    with pytest.raises((KeyError, ValueError, TypeError)):
        ProxyHeartbeat.from_dict(data)
    with pytest.raises((KeyError, ValueError, TypeError)):
        ProxyState.from_heartbeat(data)


def test_from_heartbeat_reads_each_replica_as_the_heartbeat_s_own_parse_does() -> None:
    """The view skips ReplicaReport for speed: what it reads must be what ReplicaReport reads."""
    data = {"proxy_id": "p", "url": "u", "replicas": [
        {"version": V, "state": "running", "in_flight": 2.0, "concurrency": None, "memory_mb": "512",
         "cpus": 2, "gpu": 1, "idle_s": 4},
        {"version": 3, "state": "paused", "in_flight": None, "memory_mb": None, "cpus": None, "gpu": None},
    ]}
    reports = ProxyHeartbeat.from_dict(data).replicas
    replicas = ProxyState.from_heartbeat(data).replicas
    assert [(r.version, r.state, r.in_flight, r.concurrency, r.memory_mb, r.cpus, r.gpu) for r in replicas] == \
        [(r.version, r.state, r.in_flight, r.concurrency, r.memory_mb, r.cpus, r.gpu) for r in reports] == \
        [(V, "running", 2, 1, 512, 2.0, True), ("3", "paused", 0, 1, 0, 1.0, False)]


class _NoRuntime:
    name = "none"

    def owns_peer(self, handle: str, pid: int) -> bool:
        return False


async def test_from_heartbeat_reads_the_proxys_real_payload(tmp_path: Path) -> None:
    """The payload runtime_proxy/heartbeat.py publishes, with replicas from ReplicaManager.snapshot()."""
    settings = ProxySettings(proxy_id="host-1", advertise_url="http://10.0.0.2:8081", max_replicas=5,
                             replica_concurrency=2, state_dir=str(tmp_path))
    clock = [100.0]
    manager = ReplicaManager(_NoRuntime(), settings, tmp_path / "harness.py", clock=lambda: clock[0])  # type: ignore[arg-type]
    specs = [VersionSpec("acme", "churn", "main", n, "img") for n in (1, 2)]
    for rid, spec, state, in_flight in (("r1", specs[0], "running", 1), ("r2", specs[1], "paused", 0)):
        replica = manager._new_replica(rid, spec, f"handle-{rid}", tmp_path / rid)
        replica.state, replica.in_flight = State(state), in_flight
        manager._register(replica)
    async def state() -> dict[str, object]:
        # What runtime_proxy/daemon.py's state() gives the heartbeat, every field of it.
        return {"replicas": manager.snapshot(), "waiting": {"acme/churn/main/1": 2}, "gpus": [],
                "nvml": "no NVIDIA driver", "budgets": {"memory_budget_mb": 1024, "max_replicas_per_customer": 2}}

    beat = Heartbeat(None, settings, state, "docker")  # type: ignore[arg-type]
    beat.epoch = 9
    payload = orjson.loads(orjson.dumps(await beat.payload()))  # through JSON, as Redis carries it

    state = ProxyState.from_heartbeat(payload)
    assert (state.proxy_id, state.url, state.epoch, state.max_replicas) == ("host-1", "http://10.0.0.2:8081", 9, 5)
    assert state.ts == payload["ts"] > 0
    assert sorted(state.replicas, key=lambda r: r.version) == [
        ReplicaState("acme/churn/main/1", "running", 1, 2, memory_mb=512),  # the default limit, as placement reads it
        ReplicaState("acme/churn/main/2", "paused", 0, 2, memory_mb=512),
    ]
    assert state.in_flight == 1
    assert (state.waiting, state.memory_budget_mb, state.max_replicas_per_customer) == \
        ((("acme/churn/main/1", 2),), 1024, 2)
    # One slot free of two, but two requests wait for a slot there: they take it, and we queue behind.
    assert tier_and_wait(state, "acme/churn/main/1", COSTS) == (WARM, 5.0)
    assert tier_and_wait(state, "acme/churn/main/2", COSTS) == (LUKEWARM, 25.0)
    for replica in manager.replicas.values():
        replica.client.close()


# ---- what a heartbeat means for the next request ------------------------------------------------


@pytest.mark.parametrize(
    ("replicas", "waiting", "tier", "ms"),
    [
        # in_flight never exceeds a replica's concurrency: the queue is in `waiting`
        ((rep("running", in_flight=1),), 0, WARM, 5.0),
        ((rep("running", in_flight=1),), 20, WARM, 105.0),  # 20 queued + the one running: 21 ahead
        ((rep("running", in_flight=1), rep("running", in_flight=1)), 3, WARM, 10.0),  # (2 + 3 - 2 + 1) / 2
        ((rep("running", in_flight=1, concurrency=4),), 0, WARM, 0.0),  # a free slot and nobody waiting
        ((rep("running", in_flight=4, concurrency=4),), 4, WARM, 6.25),  # (4 + 4 - 4 + 1) / 4
        ((rep("running", in_flight=0),), 1, WARM, 5.0),  # a slot just freed goes to the one waiting: we are next
        ((rep("starting"),), 0, COLD, 200.0),
        ((rep("starting"),), 3, COLD, 215.0),  # half a start, then the three waiting for it go first
        ((rep("starting"), rep("starting")), 3, COLD, 205.0),  # two take the new slots; we follow the third
        ((), 1, COLD, 205.0),  # a waiter and no replica yet: its start is under way, the heartbeat lags
        ((rep("paused"),), 5, LUKEWARM, 25.0),
    ],
)
def test_tier_and_wait_counts_the_requests_waiting_there(replicas: tuple[ReplicaState, ...], waiting: int,
                                                         tier: str, ms: float) -> None:
    p = proxy("p", *replicas, waiting={V: waiting} if waiting else None)
    assert tier_and_wait(p, V, COSTS) == (tier, ms)


def test_waiting_of_another_version_is_not_our_queue() -> None:
    p = proxy("p", rep("running", in_flight=1), waiting={OTHER: 30})
    assert tier_and_wait(p, V, COSTS) == (WARM, 5.0)


def test_a_replica_still_starting_is_preferred_over_a_cold_host() -> None:
    """A concurrent request waits for the start under way rather than start the model on a second host."""
    proxies = [proxy("empty"), proxy("starting", rep("starting")), proxy("idle-other", rep("paused", version=OTHER))]
    for seed in range(20):
        chosen = choose_proxies(proxies, V, NOW, random.Random(seed), COSTS)
        assert chosen[0].proxy.proxy_id == "starting" and chosen[0].tier == COLD


def test_a_long_queue_at_the_starting_host_sends_the_next_one_elsewhere() -> None:
    crowded = proxy("starting", rep("starting"), waiting={V: 60})  # 200 + 60 * 5 = 500 ms > a cold start
    chosen = choose_proxies([crowded, proxy("empty")], V, NOW, random.Random(0), COSTS)
    assert [c.proxy.proxy_id for c in chosen] == ["empty", "starting"]


def test_a_long_queue_at_a_warm_replica_loses_to_a_paused_one() -> None:
    queued = proxy("queued", rep("running", in_flight=1), waiting={V: 10})  # 11 ahead: 55 ms
    chosen = choose_proxies([queued, proxy("paused", rep("paused"))], V, NOW, random.Random(0), COSTS)
    assert [c.proxy.proxy_id for c in chosen] == ["paused", "queued"]


@pytest.mark.parametrize(
    ("busy", "calm"),
    [
        (proxy("busy", rep("starting", version=OTHER)), proxy("calm", rep("running", version=OTHER))),
        (proxy("busy", rep("running", in_flight=1, version=OTHER), waiting={OTHER: 4}),
         proxy("calm", rep("running", in_flight=1, version=OTHER))),
        (proxy("busy", rep("starting", version=OTHER), rep("starting", version="x")),
         proxy("calm", rep("starting", version=OTHER))),
    ],
)
def test_cold_placement_avoids_hosts_busy_starting_or_queueing(busy: ProxyState, calm: ProxyState) -> None:
    assert busy.load > calm.load
    for seed in range(20):
        chosen = choose_proxies([busy, calm], V, NOW, random.Random(seed), COSTS)
        assert [c.proxy.proxy_id for c in chosen] == ["calm", "busy"]
        assert chosen[0].tier == COLD and chosen[0].expected_ms < chosen[1].expected_ms


def test_load_counts_slots_waiters_and_starts() -> None:
    p = proxy("p", rep("running", in_flight=1), rep("starting", version=OTHER), rep("paused", version="x"),
              waiting={V: 2, OTHER: 3})
    assert (p.in_flight, p.load, p.waiting_for(V), p.waiting_for("nope")) == (1, 7, 2, 0)


def test_power_of_two_compares_load_not_only_slots() -> None:
    """Equal expected latencies (both warm with a free slot): the host with waiters of other versions loses."""
    waited = proxy("waited", rep("running"), rep("running", in_flight=1, version=OTHER), waiting={OTHER: 5})
    light = proxy("light", rep("running"), rep("running", in_flight=1, version=OTHER))
    for seed in range(30):
        assert choose_proxies([waited, light], V, NOW, random.Random(seed), COSTS)[0].proxy.proxy_id == "light"


def test_a_proxys_price_is_kept_per_heartbeat_and_costs_object_and_never_crosses_versions() -> None:
    """``ProxyState.price`` answers what ``tier_and_wait`` would, from a cache: a held version's price per
    costs object, a cold offer in one slot that a version held here must never be served from."""
    p = proxy("p", rep("running", in_flight=1), rep("paused", version=OTHER), waiting={"w": 2})
    assert p.price("cold-version", COSTS) == (400.0 + p.load * 5.0, COLD, 400.0 + p.load * 5.0)
    assert p.price(V, COSTS) == (5.0, WARM, 5.0)
    assert p.price(OTHER, COSTS) == (25.0, LUKEWARM, 25.0)  # after a cold price was kept: not served it
    assert p.price("w", COSTS)[1] == COLD and p.price("w", COSTS) == (200.0 + 10.0, COLD, 210.0)  # waited for
    dearer = StartCosts(lukewarm_ms=60.0, cold_ms=1000.0, infer_ms=7.0)
    assert p.price(V, dearer) == (7.0, WARM, 7.0) and p.price(OTHER, dearer) == (60.0, LUKEWARM, 60.0)
    assert p.price("another-cold-one", dearer)[2] == 1000.0 + p.load * 7.0
    for version in (V, OTHER, "w", "x"):
        for costs in (COSTS, dearer):
            key, tier, ms = p.price(version, costs)
            assert (tier, ms) == tier_and_wait(p, version, costs) and key == round(ms, 3)


def test_a_priced_proxy_is_freed_when_its_next_heartbeat_replaces_it() -> None:
    """Its caches hold no reference back to it (a cycle would wait for a full collection: shared/heap.py):
    pricing it and ranking it leave its reference count where it was."""
    import sys

    p = proxy("p", rep("running"), waiting={OTHER: 1})
    before = sys.getrefcount(p)
    chosen = choose_proxies([p, proxy("q")], V, NOW, random.Random(1), COSTS)
    assert chosen[0].proxy is p and p.price(OTHER, COSTS)[1] == COLD and p.load == 1 and p.by_version
    del chosen
    assert sys.getrefcount(p) == before
