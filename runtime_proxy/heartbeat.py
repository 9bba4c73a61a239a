"""The proxy's heartbeat: its state in Redis under a TTL, fenced by an epoch.

Each start takes a new, larger epoch; the heartbeat carries it, so a reader
that has seen epoch N ignores any later-arriving heartbeat of N-1 from a
proxy process that should be gone. An epoch is at least the start time in
milliseconds: after a Redis data loss the counter starts over, but a restarted
proxy still outranks every epoch an ingress remembers. A process that finds a
larger epoch than its own in Redis has been replaced, and stops (``Fenced``).
"""
from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import redis.asyncio as redis

from shared import keys
from shared.messages import ProxyHeartbeat
from shared.settings import ProxySettings


def host_resources() -> dict[str, Any]:
    """CPU count, load and memory of this host (Linux /proc; zeros elsewhere)."""
    memory_mb = available_mb = 0
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) for line in f if line.split()[1:]}
        memory_mb, available_mb = info.get("MemTotal", 0) // 1024, info.get("MemAvailable", 0) // 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = 0.0
    return {"cpus": os.cpu_count() or 1, "load1": round(load1, 2), "memory_mb": memory_mb,
            "memory_available_mb": available_mb}


class Fenced(Exception):
    """This process's epoch is over: a newer start of the same proxy id owns its replicas now."""


class Heartbeat:
    """Publishes this proxy's state; ``beat_once`` is the unit a test can drive."""

    def __init__(
        self, redis_client: redis.Redis, settings: ProxySettings, state: Callable[[], Awaitable[dict[str, Any]]],
        runtime_name: str, clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis_client
        self.settings = settings
        self.state = state
        self.runtime_name = runtime_name
        self.clock = clock
        self.epoch = 0
        self.started_at = clock()

    async def take_epoch(self) -> int:
        key = keys.proxy_epoch(self.settings.proxy_id)
        counted = int(await self.redis.incr(key))
        self.epoch = max(counted, int(self.clock() * 1000))
        if self.epoch > counted:
            await self.redis.set(key, self.epoch)  # later starts count on from here
        return self.epoch

    async def check_fence(self) -> None:
        """Raise ``Fenced`` when another process took a larger epoch for this proxy id."""
        raw = await self.redis.get(keys.proxy_epoch(self.settings.proxy_id))
        if raw is not None and int(raw) > self.epoch:
            raise Fenced(f"proxy id {self.settings.proxy_id} was taken by a newer start (epoch {int(raw)} > "
                         f"{self.epoch}): this process stops")

    async def payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "proxy_id": self.settings.proxy_id,
            "url": self.settings.advertise_url,
            "epoch": self.epoch,
            "runtime": self.runtime_name,
            "started_at": self.started_at,
            "ts": time.time(),
            "capacity": {"max_replicas": self.settings.max_replicas,
                         "replica_concurrency": self.settings.replica_concurrency, **host_resources()},
        }
        state = await self.state()
        body["capacity"].update(state.pop("budgets", {}))  # the budgets the replica manager works within
        body.update(state)
        # Through the one definition of the shape: what is published is what every reader parses.
        return ProxyHeartbeat.from_dict(body).to_dict()

    async def beat_once(self) -> None:
        await self.check_fence()  # never overwrite the heartbeat of the process that replaced this one
        payload = await self.payload()
        ttl_ms = int(self.settings.heartbeat_ttl_s * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(keys.proxy_heartbeat(self.settings.proxy_id), orjson.dumps(payload), px=ttl_ms)
            pipe.zadd(keys.PROXIES, {self.settings.proxy_id: payload["ts"]})
            await pipe.execute()

    async def withdraw(self) -> None:
        """A clean stop: readers drop this proxy now instead of at TTL expiry (unless a newer start
        of this proxy id beats there now: its heartbeat is not ours to delete)."""
        try:
            await self.check_fence()
        except Fenced:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(keys.proxy_heartbeat(self.settings.proxy_id))
            pipe.zrem(keys.PROXIES, self.settings.proxy_id)
            await pipe.execute()
