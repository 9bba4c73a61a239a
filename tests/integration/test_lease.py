"""The reconciler's lease against a real Redis: one holder among contenders, takeover, fencing."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aredis

from ingress.lease import Lease
from shared import keys
from shared.redisclient import connect

pytestmark = pytest.mark.timeout(60)

TTL_S = 1.0
INTERVAL_S = 0.1


@pytest.fixture
async def clients(redis_url: str) -> AsyncIterator[list[aredis.Redis]]:
    """One connection pool per contender, as separate ingresses would have."""
    made = [connect(redis_url, 2.0) for _ in range(4)]
    yield made
    for client in made:
        await client.aclose()


def contenders(clients: list[aredis.Redis], n: int, ttl_s: float = TTL_S) -> list[Lease]:
    return [Lease(clients[i], "test", f"ingress-{i}", ttl_s, timeout_s=1.0) for i in range(n)]


async def round_of(leases: list[Lease]) -> None:
    await asyncio.gather(*(lease.hold() for lease in leases))


@pytest.mark.parametrize("n", [2, 3])
async def test_exactly_one_holder_however_many_contend(clients: list[aredis.Redis], n: int) -> None:
    leases = contenders(clients, n)
    epochs = set()
    for _ in range(30):  # ~3 s: three TTLs of renewals
        await round_of(leases)
        holders = [lease for lease in leases if lease.held]
        assert len(holders) == 1, [(lease.holder, lease.epoch) for lease in leases]
        epochs.add(holders[0].epoch)
        value = await clients[0].get(keys.lease("test"))
        assert value == f"{holders[0].epoch}:{holders[0].holder}".encode()
        await asyncio.sleep(INTERVAL_S)
    assert epochs == {1}, "the holder kept it by renewing: one tenure"


async def test_a_holder_that_stops_renewing_is_replaced_within_the_ttl_and_an_interval(
        clients: list[aredis.Redis]) -> None:
    first, *rest = contenders(clients, 3)
    assert await first.hold()
    last_renewed = time.monotonic()
    await round_of(rest)
    assert not any(lease.held for lease in rest)
    # ``first`` dies: it never calls again. The others keep contending every interval.
    while not any(lease.held for lease in rest):
        assert time.monotonic() - last_renewed < TTL_S + INTERVAL_S + 0.3, "no takeover in time"
        await asyncio.sleep(INTERVAL_S)
        await round_of(rest)
    took_s = time.monotonic() - last_renewed
    assert TTL_S * 0.9 <= took_s <= TTL_S + INTERVAL_S + 0.3, took_s
    [successor] = [lease for lease in rest if lease.held]
    assert successor.epoch == 2 > first.epoch
    # The dead holder's own reckoning had already run out before the key did: no overlap.
    assert not first.held


async def test_a_stale_holders_epoch_is_refused(clients: list[aredis.Redis]) -> None:
    stale, fresh = contenders(clients, 2, ttl_s=0.3)
    assert await stale.try_acquire() and stale.epoch == 1
    await asyncio.sleep(0.4)  # stale stalls past its TTL (a GC pause, a hung host)
    assert not stale.held
    assert await fresh.try_acquire() and fresh.epoch == 2
    # stale wakes up and tries to act as the holder: refused, and it learns it has lost
    assert not await stale.renew()
    assert stale.epoch == 0 and not stale.held
    await stale.release()  # a stale release must not free the fresh holder's lease
    assert await clients[0].get(keys.lease("test")) == f"2:{fresh.holder}".encode()
    # the same holder id with its old epoch is refused too: the epoch, not the name, is the fence
    ghost = Lease(clients[2], "test", fresh.holder, 0.3)
    ghost.epoch = 1
    assert not await ghost.renew()
    assert await fresh.renew() and fresh.held


async def test_a_clean_release_hands_over_at_once(clients: list[aredis.Redis]) -> None:
    first, second = contenders(clients, 2, ttl_s=30.0)
    assert await first.hold()
    assert not await second.hold()
    await first.release()
    assert not first.held
    assert await second.hold() and second.epoch == 2


async def test_epochs_only_grow(clients: list[aredis.Redis]) -> None:
    lease = contenders(clients, 1)[0]
    seen = []
    for _ in range(4):
        assert await lease.hold()
        seen.append(lease.epoch)
        await lease.release()
    assert seen == [1, 2, 3, 4]


async def test_every_call_is_bounded_when_redis_hangs() -> None:
    """A Redis that accepts connections and never answers: hold() gives up within its bound, not held."""
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 20)
        await asyncio.sleep(30)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = aredis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=5)  # no read timeout of its own
    try:
        lease = Lease(client, "test", "hung", TTL_S, timeout_s=0.3)
        t0 = time.monotonic()
        assert not await lease.hold()
        assert time.monotonic() - t0 < 1.0
        await lease.release()  # nothing held: returns at once
    finally:
        server.close()
        await client.aclose()
