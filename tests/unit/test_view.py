"""The ingress's local view on fakeredis: resolve, events, heartbeats, Redis outages."""
from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
import redis.asyncio as redis

from ingress.registry import Registry, event, hash_key
from ingress.view import StateView
from shared import keys
from shared.errors import ApiError
from shared.messages import VersionSpec


@pytest.fixture
async def view(registry: Registry) -> StateView:
    """A branch acme/churn/main with versions 1..3, latest → 3, alias harrys_version → 2."""
    for i in range(3):
        await registry.create_version("acme", "churn", "main", {"image": f"img:{i + 1}"})
    await registry.set_pointer("acme", "churn", "main", "harrys_version", 2)
    return StateView(registry, clock=lambda: 1000.0)


class _Down:
    """A Redis client whose every command fails as if the server were gone."""

    def __getattr__(self, name: str) -> Any:
        async def fail(*args: Any, **kwargs: Any) -> Any:
            raise redis.ConnectionError("Connection refused")
        return fail


def redis_goes_down(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "redis", _Down())


@pytest.mark.parametrize(
    ("pointer", "number"),
    [("1", 1), ("2", 2), ("3", 3), ("latest", 3), ("harrys_version", 2)],
)
async def test_resolve(view: StateView, pointer: str, number: int) -> None:
    spec = await view.resolve("acme", "churn", "main", pointer)
    assert (spec.version, spec.image, spec.key) == (number, f"img:{number}", f"acme/churn/main/{number}")


@pytest.mark.parametrize(
    ("model", "branch", "pointer", "words"),
    [
        ("churn", "main", "nope", "no version or alias 'nope'"),
        ("churn", "main", "4", "no version 4"),
        ("churn", "main", "0", "no version 0"),
        ("churn", "staging", "latest", "no model 'churn' with branch 'staging'"),
        ("other", "main", "latest", "no model 'other'"),
        ("other", "main", "1", "no version 1"),
    ],
)
async def test_resolve_unknown_is_404(view: StateView, model: str, branch: str, pointer: str, words: str) -> None:
    with pytest.raises(ApiError) as info:
        await view.resolve("acme", model, branch, pointer)
    assert (info.value.status, info.value.type) == (404, "not_found")
    assert words in info.value.message


async def test_pointer_event_marks_dirty_and_refresh_reloads(view: StateView, registry: Registry) -> None:
    assert (await view.resolve("acme", "churn", "main", "latest")).version == 3
    await registry.set_pointer("acme", "churn", "main", "latest", 1)
    # no event seen yet: the cached pointer still answers
    assert (await view.resolve("acme", "churn", "main", "latest")).version == 3
    view.changed.clear()
    view.apply_event(event("pointers", branch="acme/churn/main"))
    assert view.changed.is_set()
    await view.refresh()
    assert (await view.resolve("acme", "churn", "main", "latest")).version == 1
    assert view.redis_ok is True
    assert view.stale_s() == 0.0


async def test_dirty_branch_not_yet_cached_is_loaded_by_refresh(view: StateView) -> None:
    view.apply_event(event("pointers", branch="acme/churn/main"))
    await view.refresh()
    assert view.pointers["acme/churn/main"] == {"latest": 3, "harrys_version": 2}


async def test_refresh_reloads_cached_pointers_without_event(view: StateView, registry: Registry) -> None:
    await view.resolve("acme", "churn", "main", "harrys_version")
    await registry.delete_pointer("acme", "churn", "main", "harrys_version")
    await view.refresh()  # the safety-net poll
    with pytest.raises(ApiError) as info:
        await view.resolve("acme", "churn", "main", "harrys_version")
    assert info.value.status == 404


async def test_version_event_forgets_cached_version(view: StateView, registry: Registry) -> None:
    spec = await view.resolve("acme", "churn", "main", "2")
    await registry.save_version(VersionSpec.from_dict(spec.to_dict() | {"retired": True}))
    assert (await view.resolve("acme", "churn", "main", "2")).retired is False  # still cached
    view.apply_event(event("version", key=spec.key))
    with pytest.raises(ApiError) as info:
        await view.resolve("acme", "churn", "main", "2")
    assert info.value.status == 404 and "retired" in info.value.message


async def test_key_deletion_event_evicts_cached_key(view: StateView, registry: Registry, client: Any) -> None:
    record, key = await registry.create_key("acme", ("predict",))
    assert await view.api_key(key) == record
    assert hash_key(key) in view.keys
    pubsub = client.pubsub()
    await pubsub.subscribe(keys.EVENTS_CHANNEL)
    await pubsub.get_message(timeout=1.0)
    await registry.delete_key("acme", record.id)
    assert await view.api_key(key) == record  # cached until the event comes
    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
    await pubsub.aclose()
    assert message is not None
    view.apply_event(message["data"])
    assert hash_key(key) not in view.keys
    assert await view.api_key(key) is None


async def test_unknown_key_is_none_and_not_cached(view: StateView) -> None:
    assert await view.api_key("lw_nope") is None
    assert view.keys == {}


@pytest.mark.parametrize("raw", [b"not json", b'{"kind": "mystery"}', b'{"no": "kind"}'])
async def test_odd_events_change_nothing(view: StateView, raw: bytes) -> None:
    await view.resolve("acme", "churn", "main", "latest")
    before = (dict(view.pointers), dict(view.versions), set(view._dirty))
    view.apply_event(raw)
    assert (dict(view.pointers), dict(view.versions), set(view._dirty)) == before


@pytest.mark.parametrize("raw", [b"[1, 2]", b"1", b'"pointers"', b"null"])
async def test_non_object_events_are_ignored(view: StateView, registry: Registry, raw: bytes) -> None:
    _, key = await registry.create_key("acme", ("predict",))
    await view.api_key(key)
    await view.resolve("acme", "churn", "main", "latest")
    view.changed.clear()
    before = (dict(view.pointers), dict(view.versions), dict(view.keys), set(view._dirty))
    view.apply_event(raw)
    assert (dict(view.pointers), dict(view.versions), dict(view.keys), set(view._dirty)) == before
    assert not view.changed.is_set(), "an ignored event signals no change"


def beat(pid: str, epoch: int, ts: float = 1000.0, **extra: Any) -> dict[str, Any]:
    return {"proxy_id": pid, "url": f"http://{pid}", "epoch": epoch, "ts": ts, **extra}


@pytest.mark.parametrize(
    ("rounds", "expected"),
    [
        # (heartbeats per refresh) → proxy id → epoch in the view after the last one
        ([[beat("p", 2)]], {"p": 2}),
        ([[beat("p", 2)], [beat("p", 3)]], {"p": 3}),
        ([[beat("p", 3)], [beat("p", 2)]], {}),  # an older process's late beat is ignored
        ([[beat("p", 3)], [beat("p", 2)], [beat("p", 3, ts=1001.0)]], {"p": 3}),
        ([[beat("p", 3), beat("q", 1)], [beat("p", 1), beat("q", 1)]], {"q": 1}),
        ([[beat("p", 1)], []], {}),  # gone from Redis: gone from the view
        ([[beat("p", 1), {"url": "broken"}, beat("q", 1, replicas=[{"state": "x"}])]], {"p": 1}),
    ],
)
def test_apply_heartbeats_fencing(rounds: list[list[dict[str, Any]]], expected: dict[str, int]) -> None:
    view = StateView(Registry(None))  # type: ignore[arg-type]
    for beats in rounds:
        view.apply_heartbeats(beats)
    assert {pid: p.epoch for pid, p in view.proxies.items()} == expected
    assert sorted(p.proxy_id for p in view.live_proxies()) == sorted(expected)


async def test_refresh_reads_heartbeats(view: StateView, client: Any) -> None:
    await client.set(keys.proxy_heartbeat("p1"), orjson.dumps(beat("p1", 4, replicas=[
        {"version": "acme/churn/main/3", "state": "running", "in_flight": 1, "concurrency": 1}])))
    await client.zadd(keys.PROXIES, {"p1": 1000.0})
    await view.refresh()
    [proxy] = view.live_proxies()
    assert (proxy.proxy_id, proxy.epoch, proxy.in_flight) == ("p1", 4, 1)


async def test_cached_pointers_survive_a_redis_outage(
    view: StateView, registry: Registry, monkeypatch: pytest.MonkeyPatch,
) -> None:
    record, key = await registry.create_key("acme", ("predict",))
    await view.api_key(key)
    for pointer in ("latest", "harrys_version", "1"):
        await view.resolve("acme", "churn", "main", pointer)
    await view.refresh()
    assert view.redis_ok
    redis_goes_down(registry, monkeypatch)

    assert (await view.resolve("acme", "churn", "main", "latest")).version == 3
    assert (await view.resolve("acme", "churn", "main", "harrys_version")).version == 2
    assert (await view.resolve("acme", "churn", "main", "1")).version == 1
    assert await view.api_key(key) == record


@pytest.mark.parametrize(
    ("model", "pointer"),
    [("churn", "2"), ("other", "latest"), ("other", "1")],
)
async def test_cache_miss_during_outage_is_503(
    view: StateView, registry: Registry, monkeypatch: pytest.MonkeyPatch, model: str, pointer: str,
) -> None:
    await view.resolve("acme", "churn", "main", "latest")
    await view.refresh()
    redis_goes_down(registry, monkeypatch)
    with pytest.raises(ApiError) as info:
        await view.resolve("acme", model, "main", pointer)
    assert (info.value.status, info.value.type) == (503, "unavailable")
    assert "Retry-After" in info.value.headers
    assert view.redis_ok is False


async def test_key_lookup_miss_during_outage_is_503(
    view: StateView, registry: Registry, monkeypatch: pytest.MonkeyPatch,
) -> None:
    redis_goes_down(registry, monkeypatch)
    with pytest.raises(ApiError) as info:
        await view.api_key("lw_unknown")
    assert info.value.status == 503


async def test_refresh_during_outage_raises_and_keeps_the_view(
    registry: Registry, monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    view = StateView(registry, clock=lambda: clock[0])
    assert view.stale_s() == float("inf")
    await view.refresh()
    assert view.redis_ok
    redis_goes_down(registry, monkeypatch)
    clock[0] = 1012.5
    with pytest.raises(redis.ConnectionError):
        await view.refresh()
    assert view.redis_ok is False
    assert view.stale_s() == 12.5


async def test_note_pointers_visible_at_once(view: StateView) -> None:
    view.note_pointers("acme", "churn", "main", {"latest": 1})
    assert (await view.resolve("acme", "churn", "main", "latest")).version == 1


async def test_a_known_keys_re_read_is_bounded_and_skipped_while_redis_is_down(
    registry: Registry, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Redis failing over must not stall warm calls: a slow re-read serves the cached record."""
    now = [1000.0]
    view = StateView(registry, clock=lambda: now[0])
    view.redis_ok = True  # as after a first poll
    record, key = await registry.create_key("acme", ("predict",))
    assert await view.api_key(key) == record
    now[0] += view.key_cache_s + 1  # stale: read again

    class Hanging:
        def __getattr__(self, name: str) -> Any:
            async def hang(*args: Any, **kwargs: Any) -> Any:
                await asyncio.Event().wait()
            return hang

    monkeypatch.setattr(registry, "redis", Hanging())
    assert await asyncio.wait_for(view.api_key(key), 2) == record
    assert view.redis_ok  # slow is not down
    view.redis_ok = False  # the poll found Redis down: no call tries it at all
    monkeypatch.setattr(registry, "redis", _Down())
    assert await view.api_key(key) == record
