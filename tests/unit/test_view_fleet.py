"""The view's incremental fleet intake on fakeredis: only changed heartbeats read, the index kept right."""
from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable
from typing import Any

import orjson
import pytest

from ingress import heartbeats
from ingress.registry import Registry
from ingress.view import QUIET_S, RELEASE_BATCH, StateView, _release, _Turn
from shared import keys
from tests.support.clock import ManualClock


def beat(pid: str, epoch: int = 1, ts: float = 1000.0, *versions: str, **extra: Any) -> dict[str, Any]:
    return {"proxy_id": pid, "url": f"http://{pid}", "epoch": epoch, "ts": ts,
            "replicas": [{"version": v, "state": "running", "in_flight": 0, "concurrency": 1} for v in versions],
            **extra}


async def publish(client: Any, body: dict[str, Any]) -> None:
    """What runtime_proxy/heartbeat.py's beat_once writes."""
    await client.set(keys.proxy_heartbeat(body["proxy_id"]), orjson.dumps(body))
    await client.zadd(keys.PROXIES, {body["proxy_id"]: body["ts"]})


async def withdraw(client: Any, pid: str) -> None:
    await client.delete(keys.proxy_heartbeat(pid))
    await client.zrem(keys.PROXIES, pid)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(1000.0)


@pytest.fixture
def fetched(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every proxy id whose heartbeat a poll read."""
    seen: list[str] = []
    real = heartbeats.fetch

    async def counting(client: Any, ids: Any) -> list[bytes | None]:
        seen.extend(ids)
        return await real(client, ids)

    monkeypatch.setattr(heartbeats, "fetch", counting)
    return seen


def holders(view: StateView, version: str) -> set[str]:
    return {p.proxy_id for p in view.proxies.holders(version)}


async def turns_during(work: Awaitable[None]) -> int:
    """How many times another task got the loop while ``work`` ran."""
    turns = 0
    done = False

    async def ticker() -> None:
        nonlocal turns
        while not done:
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    began = turns
    await work
    done = True
    await task
    return turns - began


async def test_a_poll_reads_only_the_heartbeats_that_changed(
        registry: Registry, client: Any, clock: ManualClock, fetched: list[str]) -> None:
    view = StateView(registry, clock=clock)
    for i in range(5):
        await publish(client, beat(f"p{i}", 1, 1000.0, "v1" if i < 2 else "v2"))
    await view.refresh()
    assert sorted(fetched) == [f"p{i}" for i in range(5)]
    assert holders(view, "v1") == {"p0", "p1"} and view.running_of("v2") == 3
    fetched.clear()
    await view.refresh()
    assert fetched == [], "nothing beat: nothing read"
    await publish(client, beat("p3", 1, 1001.0, "v1"))  # v2 moved off p3, v1 onto it
    await view.refresh()
    assert fetched == ["p3"]
    assert holders(view, "v1") == {"p0", "p1", "p3"} and holders(view, "v2") == {"p2", "p4"}


async def test_withdrawn_and_expired_proxies_leave_the_view_and_the_index(
        registry: Registry, client: Any, clock: ManualClock, fetched: list[str]) -> None:
    view = StateView(registry, clock=clock)
    for pid in ("a", "b", "c"):
        await publish(client, beat(pid, 1, 1000.0, "v"))
    await view.refresh()
    await withdraw(client, "a")  # a clean stop
    await client.delete(keys.proxy_heartbeat("b"))  # b died: its key expired, its score stays
    await view.refresh()
    assert set(view.proxies) == {"b", "c"}, "b looks the same until it has been quiet a while"
    clock.now += QUIET_S + 1
    await publish(client, beat("c", 1, clock.now, "v"))
    fetched.clear()
    await view.refresh()
    assert sorted(fetched) == ["b", "c"]
    assert set(view.proxies) == {"c"} and holders(view, "v") == {"c"}
    rng = random.Random(1)
    assert [p.proxy_id for p in view.candidates("v", rng)] == ["c"]


async def test_fencing_and_suspicion_hold_through_incremental_polls(
        registry: Registry, client: Any, clock: ManualClock) -> None:
    view = StateView(registry, clock=clock)
    await publish(client, beat("p", 3, 1000.0, "v"))
    await view.refresh()
    await publish(client, beat("p", 2, 1001.0, "v"))  # a late beat of an older start
    await view.refresh()
    assert "p" not in view.proxies and holders(view, "v") == set() and view.epochs["p"] == 3
    await view.refresh()
    assert "p" not in view.proxies
    await publish(client, beat("p", 3, 1002.0, "v"))
    await view.refresh()
    assert view.proxies["p"].epoch == 3 and holders(view, "v") == {"p"}
    view.suspect("p")  # refused a connection
    assert holders(view, "v") == set()
    await view.refresh()
    assert "p" not in view.proxies, "out until it beats again"
    await publish(client, beat("p", 4, 1003.0, "v"))  # restarted: a new epoch
    await view.refresh()
    assert view.proxies["p"].epoch == 4 and holders(view, "v") == {"p"}


async def test_malformed_heartbeats_are_skipped(registry: Registry, client: Any, clock: ManualClock) -> None:
    view = StateView(registry, clock=clock)
    await publish(client, beat("ok", 1, 1000.0))
    await client.set(keys.proxy_heartbeat("bad"), b"not json")
    await client.zadd(keys.PROXIES, {"bad": 1000.0})
    await client.set(keys.proxy_heartbeat("odd"), orjson.dumps(beat("other", 1, 1000.0)))
    await client.zadd(keys.PROXIES, {"odd": 1000.0})
    await view.refresh()
    assert set(view.proxies) == {"ok"}


async def test_entries_older_than_the_window_are_not_read(registry: Registry, client: Any, clock: ManualClock,
                                                          fetched: list[str]) -> None:
    view = StateView(registry, clock=clock)
    await publish(client, beat("old", 1, 100.0))
    await publish(client, beat("new", 1, 999.0))
    await view.refresh()
    assert fetched == ["new"] and set(view.proxies) == {"new"}


async def test_score_pages_miss_nobody_even_with_equal_scores(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heartbeats, "SCORE_PAGE", 4)
    members = {f"p{i:02}": 1000.0 + (i // 6) for i in range(23)}  # runs of six equal scores across pages
    await client.zadd(keys.PROXIES, members)
    assert await heartbeats.scores(client, 0.0) == members


async def test_a_big_fleet_is_taken_in_slices_that_yield_to_the_loop(
        registry: Registry, client: Any, clock: ManualClock) -> None:
    view = StateView(registry, clock=clock)
    for i in range(600):
        await publish(client, beat(f"p{i}", 1, 1000.0, *[f"v{(i * 16 + j) % 1000}" for j in range(16)]))
    ticks = await turns_during(view.refresh())
    assert len(view.proxies) == 600 and view.proxies.versions() == 1000
    assert ticks > 10, "the intake let other tasks run while it parsed"


async def test_a_polls_score_map_is_freed_in_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Freed in one step as the poll returned, the map of every live proxy's score held the loop 0.5-0.7 ms at
    5000 proxies: it is emptied a batch at a time, with the loop's turn between slices."""
    monkeypatch.setattr("ingress.view.SLICE_S", 0.0)  # every batch spends the slice
    scores = {f"p{i}": float(i) for i in range(10 * RELEASE_BATCH + 3)}
    turns = await turns_during(_release(scores, _Turn()))
    assert scores == {}
    assert turns >= 11, "the loop ran between the batches"


def test_an_unchanged_replica_list_is_kept_and_a_changed_one_replaced() -> None:
    view = StateView(Registry(None))  # type: ignore[arg-type]
    view.apply_heartbeats([beat("p", 1, 1000.0, "v1", "v2")])
    first = view.proxies["p"].replicas
    view.apply_heartbeats([beat("p", 1, 1002.0, "v1", "v2")])
    assert view.proxies["p"].ts == 1002.0 and view.proxies["p"].replicas is first
    changed = beat("p", 1, 1004.0, "v1", "v2")
    changed["replicas"][0]["memory_mb"] = 2048  # a placement field only: still a new list
    view.apply_heartbeats([changed])
    assert view.proxies["p"].replicas is not first and view.proxies["p"].replicas[0].memory_mb == 2048


def test_a_beat_keeps_the_replica_objects_it_repeats_and_replaces_the_ones_that_moved() -> None:
    """What the collector walks (shared/heap.py): a replica equal in every field to one held stays the
    held object; one that moved, or differs in a placement field only, is the new one."""
    view = StateView(Registry(None))  # type: ignore[arg-type]
    first = beat("p1", 1, 1000.0, "a/m/main/1", "b/m/main/1", "c/m/main/1", images=["img:1"])
    first["replicas"][2]["memory_mb"] = 512
    view.apply_heartbeats([first])
    held = view.proxies["p1"]
    second = beat("p1", 1, 1002.0, "a/m/main/1", "b/m/main/1", "c/m/main/1", images=["img:1"])
    second["replicas"][1]["in_flight"] = 1  # moved
    second["replicas"][2]["memory_mb"] = 1024  # a placement field only: ReplicaState's equality ignores it
    view.apply_heartbeats([second])
    now = view.proxies["p1"]
    assert now.ts == 1002.0
    assert now.replicas[0] is held.replicas[0]
    assert now.replicas[1] is not held.replicas[1] and now.replicas[1].in_flight == 1
    assert now.replicas[2] is not held.replicas[2] and now.replicas[2].memory_mb == 1024
    assert now.images is held.images
    assert view.proxies.holders("b/m/main/1") == [now]

    third = beat("p1", 1, 1004.0, "a/m/main/1", "b/m/main/1", "c/m/main/1", images=["img:1"])
    third["replicas"][1]["in_flight"] = 1
    third["replicas"][2]["memory_mb"] = 1024
    view.apply_heartbeats([third])
    assert view.proxies["p1"].replicas is now.replicas  # nothing moved: the whole tuple is kept


def test_a_beat_inherits_the_per_version_tuples_of_the_replicas_it_repeats() -> None:
    view = StateView(Registry(None))  # type: ignore[arg-type]
    view.apply_heartbeats([beat("p1", 1, 1000.0, "a/m/main/1", "b/m/main/1", "b/m/main/1")])
    held = view.proxies["p1"]
    view.apply_heartbeats([beat("p1", 1, 1001.0, "a/m/main/1", "b/m/main/1", "b/m/main/1")])
    assert view.proxies["p1"]._by_version is None  # nothing worked out yet: nothing to inherit
    held = view.proxies["p1"]
    assert set(held.by_version) == {"a/m/main/1", "b/m/main/1"}
    view.apply_heartbeats([beat("p1", 1, 1002.0, "a/m/main/1", "b/m/main/1", "b/m/main/1")])
    same = view.proxies["p1"]
    assert same.replicas is held.replicas and same.by_version is held.by_version
    moved = beat("p1", 1, 1003.0, "a/m/main/1", "b/m/main/1", "b/m/main/1", "c/m/main/1")
    moved["replicas"][0]["in_flight"] = 1
    view.apply_heartbeats([moved])
    now = view.proxies["p1"]
    assert now.by_version["b/m/main/1"] is held.by_version["b/m/main/1"]  # the same two replica objects
    assert now.by_version["a/m/main/1"] == (now.replicas[0],) and now.replicas[0].in_flight == 1
    assert now.by_version["c/m/main/1"] == (now.replicas[3],)
    fresh = {}
    for r in now.replicas:
        fresh.setdefault(r.version, []).append(r)
    assert now.by_version == {v: tuple(rs) for v, rs in fresh.items()}  # what it would have worked out


async def test_a_proxy_suspected_while_a_poll_yields_does_not_break_the_poll(
        registry: Registry, client: Any, clock: ManualClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """The poll yields between slices; a request that meets a refused proxy meanwhile drops it from the
    view (``suspect``). The poll's pass over the view must not be walking the live mapping then."""
    view = StateView(registry, clock=clock)
    for i in range(20):
        await publish(client, beat(f"p{i:02}", 1, 1000.0, "v"))
    await view.refresh()
    await withdraw(client, "p19")  # so that the poll looks for proxies gone
    monkeypatch.setattr("ingress.view.SLICE_S", 0.0)  # a yield at every step

    async def refused() -> None:
        for step in range(100):  # spread over the poll's passes: over the scores, over the view, the pages
            await asyncio.sleep(0)
            if step % 10 == 0:
                view.suspect(f"p{step // 10:02}")

    suspecting = asyncio.ensure_future(refused())
    await view.refresh()
    await suspecting
    assert view.redis_ok
    assert set(view.proxies) == {f"p{i:02}" for i in range(10, 19)}
    assert holders(view, "v") == set(view.proxies)
