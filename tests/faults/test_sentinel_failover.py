"""Faults: Redis fails over under load (Sentinel, loadtests/redis_ha.py); nothing is lost.

A real primary, replica and three Sentinels. First the client (shared/redisclient.py) alone:
acknowledged writes survive a graceful failover and a killed primary, pub/sub follows the primary,
a write that meets the demoted primary (READONLY) is retried on the new one. Then the whole stack
on the Sentinel URL, four callers in a loop while the primary fails over: every call is answered
200 or with a clear contract error (503 + Retry-After), none is lost (no 500, no exception, no
hang), and afterwards writes go on: a deploy, a new key, usage counters, heartbeats.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aredis

from ingress import state
from loadtests.common import log
from loadtests.redis_ha import HARedis, redis_ha
from shared import keys
from shared.redisclient import connect
from tests.support.stack import REPO_ROOT, Stack, running_stack, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MODELS = f"dir:{REPO_ROOT / 'tests' / 'support' / 'models'}"
REDIS_TIMEOUT_S = 2.0  # what the daemons use (ingress/app.py, runtime_proxy/daemon.py)
CALLERS = 4
# A call's bound: the deadline the ingress is given, and the client's own bound above it (a hang).
CALL_DEADLINE_S = 10
CALL_TIMEOUT_S = 20.0
# Calls answered before the failover starts, and after it ended, before the callers stop.
CALLS_BEFORE = 40
CALLS_AFTER = 80
FAILOVER_TIMEOUT_S = 60.0
# Contract errors a call may get while Redis fails over: no capacity right now, or its deadline.
CLEAR_ERRORS = {(503, "unavailable"), (504, "deadline")}

Failover = Callable[[HARedis], Awaitable[int]]


async def graceful(ha: HARedis) -> int:
    return await ha.failover(FAILOVER_TIMEOUT_S)


async def kill(ha: HARedis) -> int:
    return await ha.kill_primary(FAILOVER_TIMEOUT_S)


@pytest.fixture
async def ha(redis_sentinel: None) -> AsyncIterator[HARedis]:
    async with redis_ha(db=1) as started:
        yield started


# ---- the client alone ---------------------------------------------------------------------------


@dataclasses.dataclass
class Writes:
    """INCRs acknowledged, and errors, of writers in a loop."""

    acked: int = 0
    errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    stop: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    async def write(self, client: aredis.Redis) -> None:
        while not self.stop.is_set():
            try:
                await asyncio.wait_for(client.incr("n"), CALL_TIMEOUT_S)
                self.acked += 1
            except (aredis.RedisError, OSError, TimeoutError) as exc:
                self.errors[type(exc).__name__] += 1
            await asyncio.sleep(0.005)  # a steady stream, not a busy loop


@pytest.mark.parametrize("fail_over", [graceful, kill], ids=["graceful", "kill"])
async def test_acknowledged_writes_survive_a_failover(ha: HARedis, fail_over: Failover) -> None:
    client = connect(ha.url, REDIS_TIMEOUT_S)
    writes = Writes()
    writers = [asyncio.create_task(writes.write(client)) for _ in range(CALLERS)]
    try:
        await wait_until(lambda: writes.acked >= 100, 30, "100 writes before the failover")
        old = await ha.primary_port()
        new = await fail_over(ha)
        after = writes.acked
        await wait_until(lambda: writes.acked >= after + 100, 30, "100 writes after the failover")
    finally:
        writes.stop.set()
        await asyncio.gather(*writers)
    value = int(await client.get("n"))
    await client.aclose()
    log(f"{fail_over.__name__}: {old} → {new}, {writes.acked} writes acknowledged, counter {value}, "
        f"errors {dict(writes.errors)}")
    # Each writer has one write in flight: one whose answer was lost may have been applied and retried.
    assert writes.acked <= value <= writes.acked + CALLERS, (writes.acked, value)
    if fail_over is graceful:
        assert not writes.errors, writes.errors  # a paused write waits and is retried on the new primary
    else:
        # While no primary is up, a write whose retries (jittered, ~3 s) run out fails as on a Redis
        # that is down (MasterNotFoundError is a ConnectionError): failed, not lost.
        assert set(writes.errors) <= {"ConnectionError", "MasterNotFoundError", "TimeoutError"}, writes.errors


async def test_a_write_meeting_a_read_only_replica_is_retried_on_the_primary(ha: HARedis) -> None:
    """A connection still open to a demoted primary answers READONLY: the write goes to the new one.

    (Sentinel closes a demoted primary's connections, so the test points a held connection at the
    replica by hand: the same answer, without waiting for a race.)"""
    client = connect(ha.url, REDIS_TIMEOUT_S)
    held = aredis.Redis(connection_pool=client.connection_pool, single_connection_client=True)
    try:
        await held.set("before", "1")
        assert held.connection is not None
        replica = (await ha.replica_ports())[0]
        await held.connection.disconnect()
        await held.connection.connect_to(("127.0.0.1", replica))  # redis-py's Sentinel connection
        assert await ha.role(replica) == "slave"
        await held.set("after", "1")  # READONLY → reconnect through the Sentinels → the primary
        assert held.connection.port == await ha.primary_port()
        assert await client.get("after") == b"1"
    finally:
        await held.aclose()
        await client.aclose()


@pytest.mark.parametrize("fail_over", [graceful, kill], ids=["graceful", "kill"])
async def test_pubsub_follows_the_primary(ha: HARedis, fail_over: Failover) -> None:
    """As ingress/view.py listens: its own connection, without a read timeout, polled each second."""
    subscriber = connect(ha.url, REDIS_TIMEOUT_S, read_timeout=False)
    publisher = connect(ha.url, REDIS_TIMEOUT_S)
    got: list[int] = []
    stop = asyncio.Event()

    async def listen() -> None:
        while not stop.is_set():
            pubsub = subscriber.pubsub()
            try:
                await pubsub.subscribe("events")
                while not stop.is_set():
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        got.append(int(message["data"]))
            except (aredis.RedisError, OSError):
                await asyncio.sleep(0.1)  # then subscribe again, as the view does
            finally:
                with contextlib.suppress(aredis.RedisError, OSError, TimeoutError):
                    await asyncio.wait_for(pubsub.aclose(), 1.0)

    listener = asyncio.create_task(listen())
    sent = after = 0

    async def delivered() -> bool:
        """Publish one more; whether one published after ``after`` came through."""
        nonlocal sent
        sent += 1
        try:
            await publisher.publish("events", sent)
        except (aredis.RedisError, OSError):
            pass
        return any(n > after for n in got)

    try:
        await wait_until(delivered, 15, "a message delivered before the failover", 0.1)
        await fail_over(ha)
        started, after = time.monotonic(), sent
        # A subscriber still on a gracefully demoted primary moves when the Sentinels close its
        # connection at the demotion (10-20 s later: Sentinel waits 8 s and a 10 s INFO period); one on
        # a killed primary at once.
        await wait_until(delivered, 45, "a message delivered after the failover", 0.1)
        log(f"{fail_over.__name__}: messages delivered again {time.monotonic() - started:.2f} s after the failover")
    finally:
        stop.set()
        await asyncio.wait_for(listener, 10)
        await subscriber.aclose()
        await publisher.aclose()


# ---- the stack -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Calls:
    """What calls in a loop were answered: ``ok`` 200s, ``clear`` contract errors, ``lost`` anything else."""

    ok: int = 0
    clear: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    lost: list[str] = dataclasses.field(default_factory=list)
    slowest_s: float = 0.0
    stop: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    @property
    def answered(self) -> int:
        return self.ok + sum(self.clear.values())

    async def call(self, stack: Stack, n: int) -> None:
        started = time.monotonic()
        try:
            status, body, headers = await asyncio.wait_for(
                stack.call("echo", n, extra={"timeout_seconds": CALL_DEADLINE_S}, timeout_s=CALL_TIMEOUT_S),
                CALL_TIMEOUT_S + 1)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.lost.append(f"{type(exc).__name__}: {exc}")
            return
        finally:
            self.slowest_s = max(self.slowest_s, time.monotonic() - started)
        kind = body.get("type") if isinstance(body, dict) and isinstance(body.get("error"), str) else None
        if status == 200 and body == {"data": {"echo": n}}:
            self.ok += 1
        elif (status, kind) in CLEAR_ERRORS and (status != 503 or int(headers.get("Retry-After", "0")) >= 1):
            self.clear[f"{status} {kind}"] += 1
        else:
            self.lost.append(f"{status} {body!r}")

    async def loop(self, stack: Stack, first: int) -> None:
        n = first
        while not self.stop.is_set():
            await self.call(stack, n)
            n += CALLERS


async def usage_requests(stack: Stack) -> int:
    status, body = await stack.admin("GET", "/api/v1/customers/acme/usage")
    assert status == 200, body
    return int(body["total"]["requests"])


async def subscribers(ha: HARedis, channel: str) -> int:
    """How many connections the primary has subscribed to ``channel`` (``PUBSUB NUMSUB``)."""
    client = aredis.Redis(port=await ha.primary_port(), socket_timeout=REDIS_TIMEOUT_S)
    try:
        return int((await client.pubsub_numsub(channel))[0][1])
    finally:
        await client.aclose()


@pytest.mark.parametrize("fail_over", [graceful, kill], ids=["graceful", "kill"])
async def test_calls_during_a_redis_failover_are_answered_and_writes_resume(
        ha: HARedis, state_dir: Path, fail_over: Failover) -> None:
    async with running_stack(ha.url, state_dir, "process", ingress={"usage_flush_s": 0.5}) as stack:
        await stack.customer("acme")
        await stack.deploy("echo", MODELS, "models:echo")
        assert (await stack.call("echo", 0))[0] == 200
        counted_before = await usage_requests(stack)
        view = stack.app[state.VIEW]
        calls = Calls()
        callers = [asyncio.create_task(calls.loop(stack, i)) for i in range(CALLERS)]
        try:
            await wait_until(lambda: calls.answered + len(calls.lost) >= CALLS_BEFORE, 30, "calls before")
            started = time.monotonic()
            await fail_over(ha)
            took_s = time.monotonic() - started
            during = dataclasses.replace(calls, clear=collections.Counter(calls.clear), lost=list(calls.lost))

            # Under the same load, writes resume on the new primary: a deploy, a key, heartbeats.
            assert await stack.deploy("echo", MODELS, "models:echo") == 2
            new_key = await stack.customer("acme")
            assert (await stack.call("echo", "v2", key=new_key))[:2] == (200, {"data": {"echo": "v2"}})
            beat_after = time.time()
            await wait_until(lambda: any(p.ts > beat_after for p in view.live_proxies()), 15,
                             "a heartbeat written after the failover, in the ingress's view")
            # The set heals (graceful: the old primary demoted, its clients closed; kill: the old
            # primary back as a replica) and the ingress follows the events on the new primary.
            if ha.killed is not None:
                await ha.revive(FAILOVER_TIMEOUT_S)
            await ha.wait_settled(FAILOVER_TIMEOUT_S)
            await wait_until(lambda: subscribers(ha, keys.EVENTS_CHANNEL), 15,
                             "the ingress subscribed to the events on the new primary")
            after = calls.answered + len(calls.lost)
            await wait_until(lambda: calls.answered + len(calls.lost) >= after + CALLS_AFTER, 60, "calls after")
        finally:
            calls.stop.set()
            await asyncio.wait_for(asyncio.gather(*callers), CALL_TIMEOUT_S + 5)
        log(f"{fail_over.__name__}: failover {took_s:.2f} s; calls {calls.ok} × 200, {dict(calls.clear)}, "
            f"{len(calls.lost)} lost (by the failover's end: {during.ok} × 200, {dict(during.clear)}, "
            f"{len(during.lost)} lost); slowest {calls.slowest_s:.2f} s")
        assert not calls.lost, calls.lost[:10]
        assert view.redis_ok
        # Every answered call was counted (at least once: a flush whose answer was lost is retried).
        counted = await usage_requests(stack) - counted_before
        answered = calls.answered + 1  # and the call with the new key (the first came before)
        log(f"usage: {counted} requests counted for {answered} answered")
        assert counted >= answered, (counted, answered)
