"""The registry on fakeredis: customers, hashed keys, versions, pointers, logs."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from ingress.registry import KEY_PREFIX, LOG_LIMIT, LOG_SLICE, KeyRecord, Registry, hash_key
from shared import keys
from shared.errors import ApiError
from shared.messages import Capacity, VersionSpec


async def everything_stored(client: Any) -> list[bytes]:
    """Every key name and every value (of any type) in the database."""
    out: list[bytes] = []
    async for name in client.scan_iter():
        out.append(name)
        kind = (await client.type(name)).decode()
        if kind == "string":
            out.append(await client.get(name))
        elif kind == "hash":
            for k, v in (await client.hgetall(name)).items():
                out += [k, v]
        elif kind == "set":
            out += list(await client.smembers(name))
        elif kind == "zset":
            out += list(await client.zrange(name, 0, -1))
        elif kind == "list":
            out += list(await client.lrange(name, 0, -1))
        else:  # pragma: no cover - a new type must be added above
            raise AssertionError(f"unexpected type {kind} for {name!r}")
    return out


async def next_event(pubsub: Any) -> dict[str, Any]:
    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
    assert message is not None, "no event was published"
    return orjson.loads(message["data"])


@pytest.fixture
async def events(client: Any) -> AsyncIterator[Any]:
    pubsub = client.pubsub()
    await pubsub.subscribe(keys.EVENTS_CHANNEL)
    await pubsub.get_message(timeout=1.0)  # the subscribe confirmation
    yield pubsub
    await pubsub.aclose()


# ---- customers and keys -------------------------------------------------------------


async def test_put_customer_is_idempotent(registry: Registry, client: Any) -> None:
    assert not await registry.customer_exists("acme")
    assert await registry.put_customer("acme") is True
    first = await client.get(keys.customer("acme"))
    assert await registry.put_customer("acme") is False
    assert await client.get(keys.customer("acme")) == first  # not overwritten
    assert await registry.customer_exists("acme")
    assert await client.smembers(keys.CUSTOMERS) == {b"acme"}


@pytest.mark.parametrize("scopes", [("predict",), ("predict", "deploy"), ()])
async def test_create_and_lookup_key(registry: Registry, scopes: tuple[str, ...]) -> None:
    record, key = await registry.create_key("acme", scopes)
    assert key.startswith(KEY_PREFIX) and len(key) > 30
    assert record == KeyRecord(id=record.id, customer="acme", scopes=scopes)
    assert await registry.lookup_key(key) == record
    assert await registry.lookup_key(key + "x") is None
    assert await registry.lookup_key("") is None
    assert await registry.list_keys("acme") == [record.id]


async def test_keys_are_unique(registry: Registry) -> None:
    made = [await registry.create_key("acme", ("predict",)) for _ in range(5)]
    assert len({key for _, key in made}) == 5
    assert len({record.id for record, _ in made}) == 5
    assert await registry.list_keys("acme") == sorted(record.id for record, _ in made)


async def test_raw_key_is_never_stored(registry: Registry, client: Any) -> None:
    await registry.put_customer("acme")
    made = [await registry.create_key("acme", ("predict", "deploy")) for _ in range(3)]
    stored = await everything_stored(client)
    assert stored
    for _, key in made:
        assert not any(key.encode() in item for item in stored)
        assert any(hash_key(key).encode() in item for item in stored)  # the hash is what is kept


async def test_delete_key(registry: Registry, events: Any) -> None:
    keep, keep_key = await registry.create_key("acme", ("predict",))
    gone, gone_key = await registry.create_key("acme", ("predict",))
    await registry.delete_key("acme", gone.id)
    assert await registry.lookup_key(gone_key) is None
    assert await registry.lookup_key(keep_key) == keep
    assert await registry.list_keys("acme") == [keep.id]
    assert await next_event(events) == {"kind": "key", "hash": hash_key(gone_key)}


@pytest.mark.parametrize(("customer", "key_id"), [("acme", "nope"), ("other", None)])
async def test_delete_unknown_key_is_404(registry: Registry, customer: str, key_id: str | None) -> None:
    record, key = await registry.create_key("acme", ("predict",))
    with pytest.raises(ApiError) as info:
        await registry.delete_key(customer, key_id or record.id)  # another customer's key id
    assert info.value.status == 404
    assert await registry.lookup_key(key) == record


# ---- versions and pointers -------------------------------------------------------------


async def test_create_version_numbers_and_latest(registry: Registry, client: Any, events: Any) -> None:
    specs = [await registry.create_version("acme", "churn", "main", {"image": f"img:{i}"}) for i in range(3)]
    assert [s.version for s in specs] == [1, 2, 3]
    assert await registry.get_pointers("acme", "churn", "main") == {"latest": 3}
    assert await registry.get_version("acme", "churn", "main", 2) == specs[1]
    assert specs[1].image == "img:1" and specs[1].created_at > 0
    assert await client.smembers(keys.versions_index("acme", "churn", "main")) == {b"1", b"2", b"3"}
    assert await client.smembers(keys.branches_index()) == {b"acme/churn/main"}
    assert await next_event(events) == {"kind": "pointers", "branch": "acme/churn/main"}


async def test_create_version_without_moving_latest(registry: Registry) -> None:
    await registry.create_version("acme", "churn", "main", {"image": "a"})
    spec = await registry.create_version("acme", "churn", "main", {"image": "b"}, move_latest=False)
    assert spec.version == 2
    assert await registry.get_pointers("acme", "churn", "main") == {"latest": 1}


async def test_counters_are_per_branch(registry: Registry) -> None:
    await registry.create_version("acme", "churn", "main", {"image": "a"})
    await registry.create_version("acme", "churn", "main", {"image": "a"})
    assert (await registry.create_version("acme", "churn", "staging", {"image": "a"})).version == 1
    assert (await registry.create_version("acme", "other", "main", {"image": "a"})).version == 1
    assert (await registry.create_version("beta", "churn", "main", {"image": "a"})).version == 1


async def test_create_version_stores_the_full_spec(registry: Registry) -> None:
    fields = {"image": "img", "env": {"A": "1"}, "capacity": Capacity(1, 2, 3), "keep_warm": True, "memory_mb": 64}
    spec = await registry.create_version("acme", "churn", "feature/x", fields)
    got = await registry.get_version("acme", "churn", "feature/x", spec.version)
    assert got == spec
    assert got is not None and got.capacity == Capacity(1, 2, 3)


async def test_pointers_set_and_delete(registry: Registry, events: Any) -> None:
    await registry.create_version("acme", "churn", "main", {"image": "a"})
    await registry.create_version("acme", "churn", "main", {"image": "b"})
    await next_event(events)
    await next_event(events)
    await registry.set_pointer("acme", "churn", "main", "harrys_version", 1)
    assert await next_event(events) == {"kind": "pointers", "branch": "acme/churn/main"}
    assert await registry.get_pointers("acme", "churn", "main") == {"latest": 2, "harrys_version": 1}
    await registry.set_pointer("acme", "churn", "main", "harrys_version", 2)
    assert (await registry.get_pointers("acme", "churn", "main"))["harrys_version"] == 2
    assert await registry.delete_pointer("acme", "churn", "main", "harrys_version") is True
    assert await next_event(events) == {"kind": "pointers", "branch": "acme/churn/main"}
    assert await registry.delete_pointer("acme", "churn", "main", "harrys_version") is False
    assert await registry.get_pointers("acme", "churn", "main") == {"latest": 2}


async def test_get_pointers_of_unknown_branch(registry: Registry) -> None:
    assert await registry.get_pointers("acme", "nope", "main") == {}
    assert await registry.get_version("acme", "nope", "main", 1) is None


async def test_require_version(registry: Registry, events: Any) -> None:
    spec = await registry.create_version("acme", "churn", "main", {"image": "a"})
    assert await registry.require_version("acme", "churn", "main", 1) == spec
    await registry.save_version(VersionSpec.from_dict(spec.to_dict() | {"retired": True}))
    await next_event(events)
    assert await next_event(events) == {"kind": "version", "key": spec.key}
    for number in (1, 2):
        with pytest.raises(ApiError) as info:
            await registry.require_version("acme", "churn", "main", number)
        assert info.value.status == 404


# ---- logs and proxies ----------------------------------------------------------------------


async def test_logs_newest_first_limited_and_trimmed(registry: Registry, client: Any) -> None:
    key = keys.request_logs("acme", "churn", "main")
    await registry.append_logs([(key, {"n": i}) for i in range(LOG_LIMIT + 5)])
    assert await client.llen(key) == LOG_LIMIT
    assert await registry.read_logs("acme", "churn", "main", 3) == ([
        {"n": LOG_LIMIT + 4}, {"n": LOG_LIMIT + 3}, {"n": LOG_LIMIT + 2}], False)
    everything, cut = await registry.read_logs("acme", "churn", "main", LOG_LIMIT)
    assert [r["n"] for r in everything] == list(range(LOG_LIMIT + 4, 4, -1)) and not cut


async def test_records_of_two_branches_interleaved_keep_their_order_across_write_slices(registry: Registry) -> None:
    main, feat = keys.request_logs("acme", "churn", "main"), keys.request_logs("acme", "churn", "feat")
    count = 3 * LOG_SLICE + 7  # several pipelines, the branches' records interleaved in each
    await registry.append_logs([(main if i % 3 else feat, {"n": i}) for i in range(count)])
    for branch, mine in (("main", [i for i in range(count) if i % 3]), ("feat", list(range(0, count, 3)))):
        records, _ = await registry.read_logs("acme", "churn", branch, LOG_LIMIT)
        assert [r["n"] for r in records] == mine[::-1], branch


async def test_a_logs_answer_is_bounded_in_bytes(registry: Registry) -> None:
    key = keys.request_logs("acme", "churn", "main")
    await registry.append_logs([(key, {"n": i, "stdout": "x" * 1000}) for i in range(200)])
    logs, cut = await registry.read_logs("acme", "churn", "main", 200, max_bytes=50_000)
    assert cut and 40 <= len(logs) <= 50 and logs[0]["n"] == 199  # newest first, stopped near the bound


async def test_list_proxies_skips_expired_heartbeats(registry: Registry, client: Any) -> None:
    assert await registry.list_proxies() == []
    beat = {"proxy_id": "p1", "url": "http://p1", "epoch": 1, "ts": 5.0}
    await client.set(keys.proxy_heartbeat("p1"), orjson.dumps(beat))
    await client.zadd(keys.PROXIES, {"p1": 5.0, "p2": 4.0})  # p2's heartbeat key has expired
    assert await registry.list_proxies() == [beat]


async def test_latest_never_moves_backwards_when_deploys_race(registry: Registry) -> None:
    """v1 pre-warms (latest not moved yet) while v2 deploys and moves it; v1 ready later must not win."""
    slow = await registry.create_version("acme", "churn", "main", {"image": "a"}, move_latest=False)
    fast = await registry.create_version("acme", "churn", "main", {"image": "b"})
    assert (await registry.get_pointers("acme", "churn", "main"))["latest"] == fast.version
    assert await registry.advance_latest("acme", "churn", "main", slow.version) is False
    assert (await registry.get_pointers("acme", "churn", "main"))["latest"] == fast.version


async def test_a_failed_rollout_that_keeps_its_number_records_why(registry: Registry) -> None:
    failed = await registry.create_version("acme", "churn", "main", {"image": "a"}, move_latest=False)
    await registry.create_version("acme", "churn", "main", {"image": "b"})  # takes the next number
    await registry.withdraw_version(failed, "version never got ready (model_load_failed): boom")
    kept = await registry.get_version("acme", "churn", "main", failed.version)
    assert kept is not None and kept.retired and kept.rollout_error.endswith("boom")
    assert await registry.live_versions("acme", "churn", "main") == [2]


async def test_a_withdrawn_number_tells_the_ingresses(registry: Registry, events: Any) -> None:
    """Its number may be reused for other code: every ingress that cached it must drop it."""
    spec = await registry.create_version("acme", "churn", "main", {"image": "a"}, move_latest=False)
    assert await next_event(events) == {"kind": "pointers", "branch": "acme/churn/main"}
    await registry.withdraw_version(spec)
    assert await next_event(events) == {"kind": "version", "key": spec.key}
    # A retired tombstone until the number is reused: proxies act on a record that says so, never on a
    # missing one (a Redis data loss looks like that).
    tomb = await registry.get_version("acme", "churn", "main", spec.version)
    assert tomb is not None and tomb.retired
    assert await registry.live_versions("acme", "churn", "main") == []
    again = await registry.create_version("acme", "churn", "main", {"image": "b"})
    assert again.version == spec.version and not again.retired
