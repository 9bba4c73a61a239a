"""Unit-tier fixtures: fakeredis only (pure logic, no servers)."""
from __future__ import annotations

from collections.abc import AsyncIterator

import fakeredis
import fakeredis.aioredis
import pytest

from ingress.registry import Registry


@pytest.fixture
async def client() -> AsyncIterator[fakeredis.aioredis.FakeRedis]:
    """A fresh in-memory Redis per test."""
    redis_client = fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer())
    yield redis_client
    await redis_client.aclose()


@pytest.fixture
def registry(client: fakeredis.aioredis.FakeRedis) -> Registry:
    return Registry(client)
