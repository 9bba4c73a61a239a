"""A Redis lease with a fencing epoch: at most one holder at a time, however many contenders.

The lease is one key, ``lw:lease:<name>`` = ``<epoch>:<holder>`` under a TTL.
Acquiring sets it only while absent and takes the next epoch (INCR of
``lw:lease:<name>:epoch``) in the same transaction, so epochs only grow and
each names one tenure. Renewing and releasing compare the whole value first:
a holder whose lease lapsed and was taken by another is refused, and learns
it has lost. Each is a compare-and-set by WATCH/MULTI/EXEC (not Lua: the
ingress's Redis user may not EVAL, deploy/redis-acl.conf), using only
commands that user already has.

A holder believes it holds only until ``sent + ttl × (1 - SAFETY)``, where
``sent`` is when its last successful acquire or renew was *sent*: Redis set
the expiry later than that, so the belief ends before the key does (clock
rates permitting), and a holder cut off from Redis stops acting by itself.
When the holder dies or stops renewing, the key expires within the TTL and
the next contender's attempt takes it. Every call is bounded by ``timeout_s``.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import redis.asyncio as redis
from redis.asyncio.client import Pipeline

from shared import keys

log = logging.getLogger("lukewarm.ingress")

# Share of the TTL a holder gives up believing early: covers the round trip and clock-rate drift.
SAFETY = 0.2


class Lease:
    """One process's side of a named lease. Not safe for concurrent use by several tasks."""

    def __init__(self, client: redis.Redis, name: str, holder: str, ttl_s: float, timeout_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = client
        self.name = name
        self.holder = holder
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.clock = clock
        self.epoch = 0  # of our tenure; 0 while we hold none
        self._valid_until = float("-inf")
        self._failing = False
        self._key = keys.lease(name)
        self._epoch_key = keys.lease_epoch(name)

    @property
    def held(self) -> bool:
        """Whether we hold it now, by our own conservative reckoning."""
        return self.epoch > 0 and self.clock() < self._valid_until

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl_s * 1000))

    def _value(self, epoch: int) -> bytes:
        return f"{epoch}:{self.holder}".encode()

    async def hold(self) -> bool:
        """One step of a contender: renew when we hold it, else try to take it. Whether we hold it now.

        Never raises for Redis trouble: that is logged, and we hold it only while our reckoning says so.
        """
        try:
            held = (self.epoch > 0 and await self.renew()) or await self.try_acquire()
        except (redis.RedisError, OSError, TimeoutError) as exc:
            if not self._failing:  # once per outage, not every round
                log.warning("lease %s: %s: %s", self.name, type(exc).__name__, exc)
            self._failing = True
            return self.held
        self._failing = False
        return held

    async def try_acquire(self) -> bool:
        """Take the lease with a new epoch when nobody holds it. Raises on Redis trouble (bounded)."""
        sent = self.clock()
        async with asyncio.timeout(self.timeout_s):
            epoch = await self._acquire()
        if epoch == 0:
            self._lose()
            return False
        self.epoch = epoch
        self._valid_until = sent + self.ttl_s * (1 - SAFETY)
        log.info("lease %s taken by %s (epoch %d)", self.name, self.holder, epoch)
        return True

    async def _acquire(self) -> int:
        """The new epoch, or 0 when someone holds the lease (or took it while we looked)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(self._key, self._epoch_key)
                if await pipe.exists(self._key):
                    return 0
                # WATCH makes the INCR inside EXEC yield exactly this, so the value can name it.
                epoch = int(await pipe.get(self._epoch_key) or 0) + 1
                pipe.multi()
                pipe.incrby(self._epoch_key, 1)
                pipe.set(self._key, self._value(epoch), px=self._ttl_ms, nx=True)
                taken, stored = await pipe.execute()
            except redis.WatchError:
                return 0  # another contender moved first
        return epoch if int(taken) == epoch and stored else 0

    async def renew(self) -> bool:
        """Extend our tenure; False (and we hold nothing) when the lease is no longer ours."""
        if self.epoch <= 0:
            return False
        sent = self.clock()
        async with asyncio.timeout(self.timeout_s):
            ours = await self._if_ours(lambda pipe: pipe.set(self._key, self._value(self.epoch), px=self._ttl_ms))
        if not ours:
            log.warning("lease %s: epoch %d of %s is over (another holds it now)", self.name, self.epoch, self.holder)
            self._lose()
            return False
        self._valid_until = sent + self.ttl_s * (1 - SAFETY)
        return True

    async def release(self) -> None:
        """Give the lease back at once (a clean stop), so that another need not wait for the TTL.

        Bounded; on Redis trouble the lease simply expires.
        """
        if self.epoch <= 0:
            return
        epoch = self.epoch
        self._lose()
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._if_ours(lambda pipe: pipe.delete(self._key), epoch)
        except (redis.RedisError, OSError, TimeoutError) as exc:
            log.warning("lease %s: not released (%s); it expires within %.0f s", self.name, exc, self.ttl_s)

    async def _if_ours(self, write: Callable[[Pipeline], object], epoch: int | None = None) -> bool:
        """Apply ``write`` in a transaction only if the lease still holds our value (compare-and-set)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(self._key)
                if await pipe.get(self._key) != self._value(self.epoch if epoch is None else epoch):
                    return False
                pipe.multi()
                write(pipe)
                await pipe.execute()
            except redis.WatchError:
                return False  # changed under us: by its expiry and another's acquire, not by us
        return True

    def _lose(self) -> None:
        self.epoch = 0
        self._valid_until = float("-inf")
