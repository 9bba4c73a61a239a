"""The proxy's lifecycle policy: pure decisions from replica snapshots."""
from __future__ import annotations

import dataclasses

import pytest

from runtime_proxy.keepwarm import Plan
from runtime_proxy.policy import (ReplicaView, backoff_s, keepwarm_steps, replicas_to_evict, replicas_to_pause,
                                  replicas_to_stop)

NOW = 10_000.0


def view(rid: str, state: str = "running", *, in_flight: int = 0, idle_s: float = 0.0, timeout_s: float = 300.0,
         keep_warm: bool = False, memory_mb: int = 512, last_used: float | None = None) -> ReplicaView:
    return ReplicaView(
        replica_id=rid, version_key=f"c/m/main/{rid}", state=state, in_flight=in_flight,
        last_used=NOW - idle_s if last_used is None else last_used, idle_timeout_s=timeout_s,
        keep_warm=keep_warm, memory_mb=memory_mb,
    )


@pytest.mark.parametrize(
    ("replica", "paused"),
    [
        (view("r", idle_s=301), True),
        (view("r", idle_s=300), True),  # exactly at the timeout
        (view("r", idle_s=299.9), False),
        (view("r", idle_s=10, timeout_s=5), True),
        (view("r", idle_s=10_000, keep_warm=True), False),
        (view("r", idle_s=10_000, in_flight=1), False),
        (view("r", "paused", idle_s=10_000), False),
        (view("r", "stopped", idle_s=10_000), False),
        (view("r", "starting", idle_s=10_000), False),
    ],
)
def test_replicas_to_pause(replica: ReplicaView, paused: bool) -> None:
    assert replicas_to_pause([replica], NOW) == (["r"] if paused else [])


def test_replicas_to_pause_picks_only_the_idle_ones() -> None:
    replicas = [view("a", idle_s=400), view("b", idle_s=1), view("c", idle_s=400, keep_warm=True), view("d", idle_s=999)]
    assert replicas_to_pause(replicas, NOW) == ["a", "d"]


@pytest.mark.parametrize(
    ("replica", "stop_after_s", "stopped"),
    [
        (view("r", "paused", idle_s=300 + 3600), 3600, True),
        (view("r", "paused", idle_s=300 + 3599), 3600, False),
        (view("r", "paused", idle_s=400), 0, True),
        (view("r", "paused", idle_s=400, keep_warm=True), 0, True),  # keep_warm is about running ones
        (view("r", "paused", idle_s=10_000, in_flight=1), 0, False),
        (view("r", "running", idle_s=10_000), 0, False),
        (view("r", "stopped", idle_s=10_000), 0, False),
    ],
)
def test_replicas_to_stop(replica: ReplicaView, stop_after_s: float, stopped: bool) -> None:
    assert replicas_to_stop([replica], NOW, stop_after_s) == (["r"] if stopped else [])


@pytest.mark.parametrize(
    ("replicas", "budget_mb", "max_replicas", "incoming_mb", "expected"),
    [
        # within budgets: nothing
        ([view("a", "paused", memory_mb=500), view("b", "running", memory_mb=500)], 1000, 16, 0, []),
        ([view("a", "paused")], 0, 16, 0, []),  # budget 0 means no memory limit
        # over memory: least recently used paused first
        ([view("old", "paused", idle_s=50, memory_mb=400), view("new", "paused", idle_s=5, memory_mb=400),
          view("run", "running", memory_mb=400)], 1000, 16, 0, ["old"]),
        ([view("old", "paused", idle_s=50, memory_mb=400), view("new", "paused", idle_s=5, memory_mb=400),
          view("run", "running", memory_mb=400)], 500, 16, 0, ["old", "new"]),
        # running replicas are never evicted, even when that leaves the host over budget
        ([view("run1", "running", memory_mb=800), view("run2", "running", memory_mb=800)], 1000, 1, 0, []),
        ([view("busy", "paused", in_flight=1, memory_mb=800)], 100, 16, 0, []),
        ([view("st", "starting", memory_mb=800)], 100, 16, 0, []),
        # incoming makes room for a replica about to start
        ([view("p", "paused", memory_mb=600)], 1000, 16, 0, []),
        ([view("p", "paused", memory_mb=600)], 1000, 16, 500, ["p"]),
        ([view("p1", "paused", idle_s=9, memory_mb=300), view("p2", "paused", idle_s=1, memory_mb=300)],
         1000, 16, 500, ["p1"]),
        # the replica count: stopped go before paused, each oldest first
        ([view("p", "paused", idle_s=100), view("s", "stopped", idle_s=1), view("r", "running")], 0, 2, 0, ["s"]),
        ([view("p1", "paused", idle_s=100), view("p2", "paused", idle_s=10), view("r", "running")], 0, 2, 0, ["p1"]),
        ([view("p", "paused", idle_s=100), view("s", "stopped", idle_s=1), view("r", "running")], 0, 1, 0, ["s", "p"]),
        ([view("p", "paused"), view("r", "running")], 0, 2, 512, ["p"]),
        ([view("p", "paused"), view("r", "running")], 0, 3, 512, []),
        # a stopped replica holds no memory: evicting it does not help a memory overrun
        ([view("s", "stopped", idle_s=100, memory_mb=900), view("p", "paused", idle_s=1, memory_mb=900)],
         500, 16, 0, ["p"]),
    ],
)
def test_replicas_to_evict(replicas: list[ReplicaView], budget_mb: int, max_replicas: int, incoming_mb: int,
                           expected: list[str]) -> None:
    assert replicas_to_evict(replicas, budget_mb, max_replicas, incoming_mb) == expected


def test_evict_never_names_running_or_busy() -> None:
    replicas = [view(f"r{i}", "running", idle_s=i, memory_mb=1000) for i in range(5)]
    replicas += [view(f"b{i}", "paused", in_flight=1, idle_s=i, memory_mb=1000) for i in range(5)]
    assert replicas_to_evict(replicas, 10, 1, 1000) == []


def test_evict_order_is_lru_across_many() -> None:
    replicas = [view(f"p{i}", "paused", last_used=float(t), memory_mb=100) for i, t in enumerate([50, 10, 40, 20, 30])]
    # 500 MB used, budget 250: evict the three least recently used
    assert replicas_to_evict(replicas, 250, 16) == ["p1", "p3", "p4"]


@pytest.mark.parametrize(
    ("failures", "base_s", "cap_s", "expected"),
    [
        (0, 5.0, 300.0, 0.0),
        (-1, 5.0, 300.0, 0.0),
        (1, 5.0, 300.0, 5.0),
        (2, 5.0, 300.0, 10.0),
        (3, 5.0, 300.0, 20.0),
        (6, 5.0, 300.0, 160.0),
        (7, 5.0, 300.0, 300.0),
        (50, 5.0, 300.0, 300.0),
        (4, 1.0, 5.0, 5.0),
    ],
)
def test_backoff_s(failures: int, base_s: float, cap_s: float, expected: float) -> None:
    assert backoff_s(failures, base_s, cap_s) == expected


@pytest.mark.parametrize(
    ("last_used", "in_use", "idle_s", "max_images", "expected"),
    [
        ({}, set(), 10.0, 5, []),
        ({"a": 0.0, "b": 95.0}, set(), 10.0, 5, ["a"]),  # idle past idle_s only
        ({"a": 0.0, "b": 50.0}, {"a"}, 10.0, 5, ["b"]),  # an image in use is never pruned
        ({"a": 90.0, "b": 95.0, "c": 99.0}, set(), 100.0, 1, ["a", "b"]),  # over the count: LRU first
        ({"a": 90.0, "b": 95.0, "c": 99.0}, {"a"}, 100.0, 1, ["b", "c"]),
        ({"a": 90.0, "b": 95.0}, {"a", "b"}, 1.0, 0, []),  # everything in use: nothing to do
    ],
)
def test_images_to_prune(last_used: dict[str, float], in_use: set[str], idle_s: float, max_images: int,
                         expected: list[str]) -> None:
    from runtime_proxy.policy import images_to_prune

    assert images_to_prune(last_used, in_use, 100.0, idle_s, max_images) == expected


def _view(rid: str, key: str, state: str, last_used: float, in_flight: int = 0, keep_warm: bool = False,
          memory_mb: int = 100) -> ReplicaView:
    return ReplicaView(replica_id=rid, version_key=key, state=state, in_flight=in_flight, last_used=last_used,
                       idle_timeout_s=300, keep_warm=keep_warm, memory_mb=memory_mb)


def test_a_full_host_evicts_idle_running_replicas_when_a_start_needs_room() -> None:
    """keep_warm must not let one customer hold every slot: idle running replicas go last, LRU."""
    replicas = [_view("r1", "a/m/main/1", "running", 10, keep_warm=True),
                _view("r2", "a/m/main/2", "running", 5, keep_warm=True),
                _view("r3", "b/m/main/1", "running", 1, in_flight=1)]
    assert replicas_to_evict(replicas, 0, 3, incoming_mb=100) == []
    assert replicas_to_evict(replicas, 0, 3, incoming_mb=100, evict_running=True) == ["r2"]
    assert replicas_to_evict(replicas, 250, 8, incoming_mb=100, evict_running=True) == ["r2", "r1"]


def test_starts_already_making_room_count_as_incoming_too() -> None:
    """Two starts at once on a one-replica host: the second must make room for the first one as well."""
    replicas = [_view("r1", "a/m/main/1", "running", 10)]
    assert replicas_to_evict(replicas, 0, 2, incoming_mb=100, evict_running=True) == []
    assert replicas_to_evict(replicas, 0, 2, incoming_mb=200, evict_running=True, incoming=2) == ["r1"]


@pytest.mark.parametrize(
    ("replicas", "quota", "expected"),
    [
        ([], 1, []),
        ([_view("a1", "acme/m/main/1", "running", 5)], 2, []),
        ([_view("a1", "acme/m/main/1", "running", 5)], 1, ["a1"]),
        ([_view("a1", "acme/m/main/1", "running", 5), _view("a2", "acme/m/main/2", "paused", 9)], 2, ["a2"]),
        ([_view("a1", "acme/m/main/1", "running", 5, in_flight=1)], 1, None),
        ([_view("a1", "acme/m/main/1", "stopped", 5), _view("g1", "globex/m/main/1", "running", 1)], 1, []),
        ([_view("x1", "acme2/m/main/1", "running", 5)], 1, []),  # a customer named like a prefix of another
    ],
)
def test_quota_evictions(replicas: list[ReplicaView], quota: int, expected: list[str] | None) -> None:
    from runtime_proxy.policy import quota_evictions

    assert quota_evictions(replicas, "acme", quota) == expected


def test_quota_counts_the_customers_starts_on_their_way() -> None:
    """Room made for a start of theirs that is not a replica yet still counts against the quota: two
    starts at once may not both fit under it."""
    from runtime_proxy.policy import quota_evictions

    idle = [_view("a1", "acme/m/main/1", "running", 5)]
    assert quota_evictions([], "acme", 1, starting=1) is None
    assert quota_evictions(idle, "acme", 2, starting=1) == ["a1"]
    assert quota_evictions(idle, "acme", 3, starting=1) == []


def _stopped(rid: str, key: str, last_used: float, keep: int = 0, state: str = "stopped") -> ReplicaView:
    return ReplicaView(replica_id=rid, version_key=key, state=state, in_flight=0, last_used=last_used,
                       idle_timeout_s=10, keep_warm=False, memory_mb=100, keep=keep)


@pytest.mark.parametrize(
    ("replicas", "expected"),
    [
        ([_stopped("a", "v1", 0)], ["a"]),                                      # 10 + 20 + 30 s idle: gone
        ([_stopped("a", "v1", 1)], []),                                         # 59 s: not idle long enough
        ([_stopped("a", "v1", 0, keep=1), _stopped("b", "v1", 1, keep=1)], ["a"]),  # the newer one is kept
        ([_stopped("a", "v1", 0, keep=1), _stopped("r", "v1", 5, keep=1, state="running")], ["a"]),  # min met
        ([_stopped("a", "v1", 0, keep=2), _stopped("b", "v2", 0)], ["b"]),
        ([_stopped("p", "v1", 0, state="paused")], []),                         # only stopped ones
    ],
)
def test_replicas_to_remove(replicas: list[ReplicaView], expected: list[str]) -> None:
    from runtime_proxy.policy import replicas_to_remove

    assert replicas_to_remove(replicas, 60.0, 20, 30) == expected  # idle 10 + 20 + 30 s at t=60 since 0


# ---- "auto" idle timeouts: keepwarm_steps ------------------------------------------------


def auto(rid: str, state: str, key: str = "c/m/main/1", in_flight: int = 0, keep: int = 0,
         keep_warm: bool = False, last_used: float = NOW) -> ReplicaView:
    return ReplicaView(replica_id=rid, version_key=key, state=state, in_flight=in_flight, last_used=last_used,
                       idle_timeout_s=300.0, keep_warm=keep_warm, memory_mb=512, keep=keep, auto=True)


# Idle since NOW: stop at once, pre-warm at +100, hold until +140 (what a two-minute timer plans).
TIMER = Plan("histogram", NOW, NOW, NOW, NOW + 100, NOW + 140)


@pytest.mark.parametrize(
    ("replica", "at", "steps"),
    [
        (auto("r", "running"), NOW + 1, [("stop", "r")]),
        (auto("r", "paused"), NOW + 1, [("stop", "r")]),
        (auto("r", "stopped"), NOW + 50, []),
        (auto("r", "stopped"), NOW + 101, [("prewarm", "r")]),
        (auto("r", "running"), NOW + 101, [("pause", "r")]),  # pre-warmed: waits frozen
        (auto("r", "paused"), NOW + 120, []),
        (auto("r", "paused"), NOW + 141, [("stop", "r")]),  # the call never came
        (auto("r", "stopped"), NOW + 141 + 86_400, [("remove", "r")]),
        (auto("r", "stopped", keep=1), NOW + 141 + 86_400, []),  # capacity.min keeps it on disk
        (auto("r", "running", in_flight=1), NOW + 1, []),
        (auto("r", "running", keep_warm=True), NOW + 1, []),
        (auto("r", "starting"), NOW + 1, []),
    ],
)
def test_keepwarm_steps_follow_the_versions_plan(replica: ReplicaView, at: float,
                                                 steps: list[tuple[str, str]]) -> None:
    assert keepwarm_steps([replica], {replica.version_key: TIMER}, at, remove_after_s=86_400) == steps


def test_keepwarm_steps_without_a_plan_use_the_fallback_from_the_replicas_own_last_use() -> None:
    idle = auto("idle", "running", last_used=NOW - 301)
    fresh = auto("fresh", "running", last_used=NOW - 10)
    assert keepwarm_steps([idle, fresh], {}, NOW, remove_after_s=86_400) == [("stop", "idle")]


def test_the_fixed_rules_leave_auto_versions_alone_and_keepwarm_steps_leave_fixed_ones() -> None:
    fixed = view("f", idle_s=10_000)
    mine = dataclasses.replace(fixed, replica_id="a", auto=True)
    assert replicas_to_pause([fixed, mine], NOW) == ["f"]
    assert replicas_to_stop([dataclasses.replace(fixed, state="paused"), dataclasses.replace(mine, state="paused")],
                            NOW, stop_after_s=0) == ["f"]
    assert keepwarm_steps([fixed, mine], {}, NOW, remove_after_s=0) == [("stop", "a")]


def test_fits_counts_replicas_and_memory() -> None:
    from runtime_proxy.policy import fits

    assert fits(live=1, live_mb=512, incoming_mb=512, max_replicas=2, memory_budget_mb=1024)
    assert not fits(live=2, live_mb=512, incoming_mb=1, max_replicas=2, memory_budget_mb=4096)  # the count
    assert not fits(live=1, live_mb=600, incoming_mb=512, max_replicas=4, memory_budget_mb=1024)  # the memory
