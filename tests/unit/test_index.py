"""The fleet index: holders per version and the room sampler kept right by every write, whatever the order."""
from __future__ import annotations

import random

import pytest

from ingress.index import RANKED_HOLDERS, VERSION_SHARDS, FleetIndex, has_room
from ingress.router import ProxyState, ReplicaState, choose_proxies

NOW = 1000.0
MAX_AGE_S = 15.0


def proxy(pid: str, *replicas: tuple[str, str], ts: float = NOW, max_replicas: int = 4, epoch: int = 1,
          waiting: tuple[tuple[str, int], ...] = (), in_flight: int = 0) -> ProxyState:
    return ProxyState(pid, f"http://{pid}", epoch, ts, tuple(ReplicaState(v, s, in_flight, 1) for v, s in replicas),
                      max_replicas=max_replicas, waiting=waiting)


def scan_holders(fleet: dict[str, ProxyState], version: str) -> set[str]:
    """What the index must say, by brute force over the whole fleet."""
    return {pid for pid, p in fleet.items()
            if any(r.version == version for r in p.replicas) or any(v == version and n for v, n in p.waiting)}


def scan_running(fleet: dict[str, ProxyState], version: str) -> int:
    return sum(1 for p in fleet.values() for r in p.replicas if r.version == version and r.state in ("running", "starting"))


def scan_warm(fleet: dict[str, ProxyState], version: str) -> set[str]:
    return {pid for pid, p in fleet.items() if any(r.version == version and r.state == "running" for r in p.replicas)}


def test_holders_follow_replicas_added_removed_and_moved() -> None:
    index = FleetIndex()
    index["a"] = proxy("a", ("v1", "running"), ("v2", "paused"))
    index["b"] = proxy("b", ("v1", "stopped"))
    assert {p.proxy_id for p in index.holders("v1")} == {"a", "b"}
    assert [p.proxy_id for p in index.holders("v2")] == ["a"]
    index["a"] = proxy("a", ("v3", "starting"))  # a's next heartbeat: v1 and v2 gone, v3 starting
    assert [p.proxy_id for p in index.holders("v1")] == ["b"]
    assert index.holders("v2") == [] and index.versions() == 2
    index["b"] = proxy("b")
    index["c"] = proxy("c", ("v1", "running"))  # v1 moved from b to c
    assert [p.proxy_id for p in index.holders("v1")] == ["c"]
    del index["c"]
    assert index.holders("v1") == [] and index.running_of("v3") == 1
    assert index.pop("a").proxy_id == "a" and index.pop("zz", None) is None
    assert index.versions() == 0 and index.with_room() == 1


def test_a_version_with_requests_waiting_is_held_before_its_replica_shows() -> None:
    index = FleetIndex({"a": proxy("a", waiting=(("v1", 3),)), "b": proxy("b", waiting=(("v1", 0),))})
    assert [p.proxy_id for p in index.holders("v1")] == ["a"]
    assert index.running_of("v1") == 0


def test_dict_writes_of_every_kind_keep_the_index_right() -> None:
    index = FleetIndex()
    index.update({"a": proxy("a", ("v", "running"))}, b=proxy("b", ("v", "paused")))
    index.setdefault("c", proxy("c", ("v", "running")))
    assert {p.proxy_id for p in index.holders("v")} == {"a", "b", "c"}
    index |= {"c": proxy("c")}
    assert {p.proxy_id for p in index.holders("v")} == {"a", "b"}
    pid, _ = index.popitem()
    assert pid == "c" and index.running_of("v") == 1
    index.clear()
    assert index.holders("v") == [] and index.sample(random.Random(1), 2, NOW, MAX_AGE_S) == []


@pytest.mark.parametrize("seed", range(8))
def test_random_heartbeats_keep_the_index_equal_to_a_scan(seed: int) -> None:
    rng = random.Random(seed)
    versions = [f"v{i}" for i in range(12)]
    index = FleetIndex()
    plain: dict[str, ProxyState] = {}
    for step in range(400):
        pid = f"p{rng.randrange(30)}"
        if rng.random() < 0.2:
            index.pop(pid, None)
            plain.pop(pid, None)
        else:
            reps = tuple((rng.choice(versions), rng.choice(["running", "paused", "stopped", "starting"]))
                         for _ in range(rng.randrange(6)))
            waiting = ((rng.choice(versions), rng.randrange(3)),) if rng.random() < 0.3 else ()
            state = proxy(pid, *reps, ts=NOW - rng.choice([0.0, 1.0, 30.0]), waiting=waiting)
            index[pid] = state
            plain[pid] = state
        assert dict(index) == plain
        for version in versions:
            assert {p.proxy_id for p in index.holders(version)} == scan_holders(plain, version)
            assert index.running_of(version) == scan_running(plain, version)
            found = index.candidates(version, rng, 2, NOW, MAX_AGE_S)
            ids = [p.proxy_id for p in found]
            assert len(ids) == len(set(ids)), "no proxy twice"
            held = scan_holders(plain, version)
            if len(held) <= RANKED_HOLDERS:
                assert set(ids) >= held, "every holder is a candidate"
            else:
                live = {pid for pid in held if NOW - plain[pid].ts <= MAX_AGE_S}
                drawn = set(ids) & held
                assert drawn <= live and len(drawn) <= RANKED_HOLDERS, "a few live holders drawn"
                assert drawn or not live
                if live & scan_warm(plain, version):
                    assert drawn & scan_warm(plain, version), "a warm holder among them"
            assert len(set(ids) - held) <= 2, "at most d sampled"
            split = index._split.get(version)
            if len(held) > RANKED_HOLDERS:
                assert split is not None and set(split[0]) == scan_warm(plain, version)
                assert set(split[1]) == held - scan_warm(plain, version)
            else:
                assert split is None, "kept for widely held versions only"
        assert index.with_room() == sum(1 for p in plain.values() if has_room(p))
        assert set(index._running) <= set(index._holders), "no count outlives the version's holders"


def test_a_widely_held_version_ranks_a_few_holders_warm_first_whatever_their_number() -> None:
    """capacity.max goes to 1000: a request must not rank every host a popular version runs on."""
    fleet = {f"w{i}": proxy(f"w{i}", ("v", "running"), max_replicas=1) for i in range(300)}
    fleet |= {f"p{i}": proxy(f"p{i}", ("v", "paused"), max_replicas=1) for i in range(100)}
    fleet |= {f"s{i}": proxy(f"s{i}", ("v", "running"), ts=NOW - 60, max_replicas=1) for i in range(50)}
    fleet |= {f"room{i}": proxy(f"room{i}") for i in range(20)}
    index = FleetIndex(fleet)
    assert index.running_of("v") == 350
    rng = random.Random(5)
    seen: set[str] = set()
    for _ in range(600):
        found = [p.proxy_id for p in index.candidates("v", rng, 2, NOW, MAX_AGE_S, exclude=frozenset({"w0"}))]
        holders = [pid for pid in found if not pid.startswith("room")]
        assert len(holders) == RANKED_HOLDERS and len(found) == RANKED_HOLDERS + 2
        assert sum(pid.startswith("w") for pid in holders) == RANKED_HOLDERS - 1, "warm first, one place kept"
        assert sum(pid.startswith("p") for pid in holders) == 1
        assert "w0" not in found and not any(pid.startswith("s") for pid in found), "excluded and stale left out"
        seen.update(holders)
    assert len([pid for pid in seen if pid.startswith("w")]) > 250, "drawn across the warm holders"
    paused_only = FleetIndex({f"p{i}": proxy(f"p{i}", ("v", "paused")) for i in range(9)})
    assert len(paused_only.candidates("v", rng, 2, NOW, MAX_AGE_S)) == RANKED_HOLDERS


def test_a_few_holders_are_all_ranked_in_their_order() -> None:
    fleet = {f"h{i}": proxy(f"h{i}", ("v", "paused" if i % 2 else "running")) for i in range(RANKED_HOLDERS)}
    index = FleetIndex(fleet | {"room": proxy("room")})
    found = [p.proxy_id for p in index.candidates("v", random.Random(1), 2, NOW, MAX_AGE_S)]
    assert found == [*fleet, "room"]


def test_sampler_draws_only_live_proxies_with_room_and_at_most_d() -> None:
    fleet = {f"room{i}": proxy(f"room{i}") for i in range(20)}
    fleet |= {f"full{i}": proxy(f"full{i}", *[("x", "running")] * 4) for i in range(20)}
    fleet |= {f"stale{i}": proxy(f"stale{i}", ts=NOW - 16) for i in range(20)}
    index = FleetIndex(fleet)
    rng = random.Random(3)
    seen: set[str] = set()
    for _ in range(300):
        picked = index.sample(rng, 3, NOW, MAX_AGE_S, skip={"room0"})
        assert 1 <= len(picked) <= 3 and len({p.proxy_id for p in picked}) == len(picked)
        assert all(p.proxy_id.startswith("room") and p.proxy_id != "room0" for p in picked)
        seen.update(p.proxy_id for p in picked)
    assert len(seen) == 19, "uniform over the live ones with room"


def test_a_full_fleet_samples_full_hosts_and_a_stale_fleet_none() -> None:
    full = FleetIndex({f"f{i}": proxy(f"f{i}", *[("x", "running")] * 4) for i in range(10)})
    picked = full.sample(random.Random(1), 2, NOW, MAX_AGE_S)
    assert len(picked) == 2 and all(p.proxy_id.startswith("f") for p in picked)
    stale = FleetIndex({f"s{i}": proxy(f"s{i}", ts=NOW - 100) for i in range(10)})
    assert stale.sample(random.Random(1), 2, NOW, MAX_AGE_S) == []
    assert stale.candidates("v", random.Random(1), 2, NOW, MAX_AGE_S) == []


def test_candidates_find_the_one_live_proxy_among_many_stale_ones() -> None:
    """Sampling is bounded; when it finds nothing the fallback still routes to a live proxy."""
    fleet = {f"s{i}": proxy(f"s{i}", ts=NOW - 100) for i in range(500)} | {"live": proxy("live")}
    index = FleetIndex(fleet)
    found = index.candidates("v", random.Random(2), 2, NOW, MAX_AGE_S)
    assert [p.proxy_id for p in found] == ["live"]
    assert index.candidates("v", random.Random(2), 2, NOW, MAX_AGE_S, exclude=frozenset({"live"})) == []


def test_excluded_holders_and_samples_are_left_out() -> None:
    index = FleetIndex({"a": proxy("a", ("v", "running")), "b": proxy("b"), "c": proxy("c")})
    found = index.candidates("v", random.Random(1), 5, NOW, MAX_AGE_S, exclude=frozenset({"a", "b"}))
    assert [p.proxy_id for p in found] == ["c"]


def random_fleet(seed: int) -> dict[str, ProxyState]:
    """60 proxies holding 0-3 replicas each of 40 versions, running or paused, a slot taken or not."""
    rng = random.Random(seed)
    fleet = {}
    for i in range(60):
        reps = [(f"v{rng.randrange(40)}", rng.choice(["running", "paused"])) for _ in range(rng.randrange(4))]
        fleet[f"p{i}"] = proxy(f"p{i}", *reps, max_replicas=4, in_flight=rng.randrange(2))
    return fleet


def test_cold_hosts_are_sampled_only_when_no_live_holder_has_a_warm_slot_free() -> None:
    fleet = {f"room{i}": proxy(f"room{i}") for i in range(10)}
    free = FleetIndex(fleet | {"warm": proxy("warm", ("v", "running")), "paused": proxy("paused", ("v", "paused"))})
    found = free.candidates("v", random.Random(1), 2, NOW, MAX_AGE_S, cold_if_busy=True)
    assert [p.proxy_id for p in found] == ["warm", "paused"]
    assert len(free.candidates("v", random.Random(1), 2, NOW, MAX_AGE_S)) == 4, "without the flag: sampled as ever"
    for holders in ({"busy": proxy("busy", ("v", "running"), in_flight=1)},  # its one slot taken
                    {"queued": proxy("queued", ("v", "running"), waiting=(("v", 2),))},  # free slot, queue ahead
                    {"stale": proxy("stale", ("v", "running"), ts=NOW - 16)},  # free, but its heartbeat too old
                    {"paused": proxy("paused", ("v", "paused"))}):  # a thaw is not a free slot
        index = FleetIndex(fleet | holders)
        found = index.candidates("v", random.Random(1), 2, NOW, MAX_AGE_S, cold_if_busy=True)
        assert [p.proxy_id for p in found][:1] == list(holders) and len(found) == 3, holders


@pytest.mark.parametrize("seed", range(5))
def test_leaving_out_cold_hosts_when_a_slot_is_free_does_not_change_the_best_choice(seed: int) -> None:
    index = FleetIndex(random_fleet(seed))
    lean = 0
    for n in range(40):
        version = f"v{n}"
        every = choose_proxies(index.candidates(version, random.Random(1), 2, NOW, MAX_AGE_S), version, NOW,
                               random.Random(1))
        some = choose_proxies(index.candidates(version, random.Random(1), 2, NOW, MAX_AGE_S, cold_if_busy=True),
                              version, NOW, random.Random(1))
        lean += len(some) < len(every)
        assert (some[0].tier, some[0].expected_ms) == (every[0].tier, every[0].expected_ms)
    assert lean, "some versions had a slot free"


@pytest.mark.parametrize("seed", range(5))
def test_routing_over_candidates_matches_the_full_scan_for_held_versions(seed: int) -> None:
    """A few holders are all candidates, so the best tier and its cost are the full scan's; past
    ``RANKED_HOLDERS`` the best tier still is (warm holders are drawn first), its queue the best drawn."""
    fleet = random_fleet(seed)
    index = FleetIndex(fleet)
    for n in range(40):
        version = f"v{n}"
        full = choose_proxies(list(fleet.values()), version, NOW, random.Random(1))
        fast = choose_proxies(index.candidates(version, random.Random(1), 2, NOW, MAX_AGE_S), version, NOW,
                              random.Random(1))
        held = scan_holders(fleet, version)
        if not held:
            assert fast[0].tier == full[0].tier == "cold"  # power of d choices: a sampled host, not the global best
            continue
        if len(held) > RANKED_HOLDERS:
            assert fast[0].tier == full[0].tier and fast[0].expected_ms >= full[0].expected_ms
            assert len({c.proxy.proxy_id for c in fast} & held) == RANKED_HOLDERS
            continue
        assert (fast[0].tier, fast[0].expected_ms) == (full[0].tier, full[0].expected_ms)
        assert {c.proxy.proxy_id for c in full if c.proxy.proxy_id in held} <= {c.proxy.proxy_id for c in fast}


class CountingDict(dict[str, dict[str, int]]):
    """The index's version map, counting its writes."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.writes = 0

    def __setitem__(self, key: str, value: dict[str, int]) -> None:
        self.writes += 1
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self.writes += 1
        super().__delitem__(key)

    def setdefault(self, key: str, default: dict[str, int]) -> dict[str, int]:  # type: ignore[override]
        if key not in self:
            self.writes += 1
        return super().setdefault(key, default)


def test_a_beat_touches_only_the_versions_whose_count_changed() -> None:
    """Removing and re-adding every version at each beat filled the big version map with deleted slots,
    and its rehash held the loop (fleet_scale at 5000 proxies)."""
    index = FleetIndex()
    index["a"] = proxy("a", ("v1", "running"), ("v2", "paused"), ("v2", "running"))
    spies = index._holders._shards = [CountingDict(shard) for shard in index._holders._shards]
    index["a"] = proxy("a", ("v1", "paused"), ("v2", "running"), ("v2", "running"), ts=NOW + 2)  # states moved only
    assert sum(spy.writes for spy in spies) == 0
    assert index.running_of("v1") == 0 and "v1" in index._running, "a count at 0 stays: no deleted slot"
    assert {p.proxy_id for p in index.holders("v1")} == {"a"} and index.holders("v1")[0].ts == NOW + 2
    index["a"] = proxy("a", ("v2", "running"), ("v3", "starting"), ts=NOW + 4)  # v1 gone, v2 one fewer, v3 new
    assert index.holders("v1") == [] and "v1" not in index._holders
    assert [p.proxy_id for p in index.holders("v2")] == ["a"] and [p.proxy_id for p in index.holders("v3")] == ["a"]
    assert sum(spy.writes for spy in spies) == 2  # v1 deleted, v3 added; v2's count changed in place
    index["a"] = proxy("a", ("v2", "running"), ts=NOW + 6, max_replicas=1)  # full now: out of the room pool
    assert not has_room(index["a"]) and index.with_room() == 0
    index["a"] = proxy("a", ts=NOW + 8, max_replicas=1)
    assert index.with_room() == 1 and index.versions() == 0


def test_the_version_maps_are_spread_over_shards_none_holding_more_than_its_share() -> None:
    """A dict grows by rebuilding itself whole: the one holders map of 44 000 versions held the loop 1-1.6 ms
    in a heartbeat's apply (fleet_scale, 5000 proxies). Each shard rebuilds its share only."""
    index = FleetIndex()
    versions = 64 * VERSION_SHARDS
    for i in range(versions // 4):
        index[f"p{i}"] = proxy(f"p{i}", *((f"v{4 * i + k}", "running") for k in range(4)))
    for name in ("_holders", "_running"):
        shards = getattr(index, name)._shards
        assert len(shards) == VERSION_SHARDS and sum(map(len, shards)) == versions
        assert max(map(len, shards)) <= 2 * versions / VERSION_SHARDS, name
    assert index.versions() == versions and index.running_of("v7") == 1 and "v7" in index._holders
    del index["p1"]
    assert "v7" not in index._holders and "v7" not in set(index._running) and index.versions() == versions - 4
