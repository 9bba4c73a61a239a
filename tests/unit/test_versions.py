"""The proxy reads what a chunk runs from the registry: unknown, retired, redeployed, Redis down."""
from __future__ import annotations

from typing import Any

import orjson
import pytest
import redis.asyncio as redis

from runtime_proxy.versions import VersionSource
from shared import keys
from shared.errors import ApiError
from shared.messages import VersionSpec

SPEC = VersionSpec("acme", "churn", "main", 3, "lukewarm-acme/churn:1", created_at=100.0)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def _store(client: Any, spec: VersionSpec) -> None:
    await client.set(keys.version(spec.customer, spec.model, spec.branch, spec.version), orjson.dumps(spec.to_dict()))


async def test_reads_the_registry_and_caches(client: Any) -> None:
    await _store(client, SPEC)
    clock = _Clock()
    source = VersionSource(client, cache_s=5, clock=clock)
    assert await source.get(SPEC.key, 100.0) == SPEC
    await client.flushdb()
    assert await source.get(SPEC.key, 100.0) == SPEC  # cached
    clock.now = 6
    with pytest.raises(ApiError) as info:
        await source.get(SPEC.key, 100.0)
    assert info.value.status == 404


async def test_retired_is_404_within_the_cache_life(client: Any) -> None:
    await _store(client, SPEC)
    clock = _Clock()
    source = VersionSource(client, cache_s=5, clock=clock)
    await source.get(SPEC.key, 100.0)
    await _store(client, VersionSpec.from_dict(SPEC.to_dict() | {"retired": True}))
    clock.now = 5.5
    with pytest.raises(ApiError) as info:
        await source.get(SPEC.key, 100.0)
    assert info.value.status == 404


async def test_a_redeployed_number_is_read_again_at_once(client: Any) -> None:
    await _store(client, SPEC)
    source = VersionSource(client, cache_s=60, clock=_Clock())
    await source.get(SPEC.key, 100.0)
    other = VersionSpec.from_dict(SPEC.to_dict() | {"created_at": 200.0, "image": "lukewarm-acme/other:1"})
    await _store(client, other)
    assert (await source.get(SPEC.key, 200.0)).image == "lukewarm-acme/other:1"
    with pytest.raises(ApiError) as info:
        await source.get(SPEC.key, 100.0)  # an ingress that still holds the old deploy
    assert (info.value.status, info.value.type) == (503, "version_changed")


class _Down:
    async def get(self, key: str) -> None:
        raise redis.ConnectionError("down")


async def test_redis_down_serves_what_it_knows_and_refuses_the_rest(client: Any) -> None:
    await _store(client, SPEC)
    clock = _Clock()
    source = VersionSource(client, cache_s=1, clock=clock)
    await source.get(SPEC.key, 100.0)
    source.client = _Down()  # type: ignore[assignment]
    clock.now = 10
    assert await source.get(SPEC.key, 100.0) == SPEC
    with pytest.raises(ApiError) as info:
        await source.get("acme/churn/main/4", 100.0)
    assert info.value.status == 503


@pytest.mark.parametrize("key", ["acme/churn/main", "acme/../x/1", "a/b/c/0", "A/b/c/1"])
async def test_malformed_keys_are_400(client: Any, key: str) -> None:
    with pytest.raises(ApiError) as info:
        await VersionSource(client, cache_s=1).get(key, 1.0)
    assert info.value.status == 400
