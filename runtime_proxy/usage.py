"""Replica-seconds: how long each version's replicas ran (and sat paused) on this host, for billing.

Every tick reads the replica states (``ReplicaManager.snapshot()``: only ``version``
and ``state`` are used) and accrues the time elapsed since the previous tick, by
the monotonic clock, into UTC-hour buckets in memory; a flush adds them to Redis
(``shared.keys.usage_hour``) in one pipeline. Ticks that come late (a busy loop)
lose nothing: the gap is measured, not assumed.

Between two ticks the state of a replica is known only at both ends. The
interval is credited by the trapezoid rule: a replica seen in a state at both
ends gets the whole interval, one seen at one end only (it started, paused or
went between the ticks) half of it. The error per transition is at most half a
tick and averages zero, so with a tick of a few seconds a replica that ran for
a minute is billed within a few percent of the wall time it really ran.

What is billed: ``running`` → ``replica_seconds``, ``paused`` → ``paused_seconds``;
``starting``, ``stopped`` and ``dead`` replicas hold no compute and are not billed.
Known limit: the seconds between a proxy's last tick and its restart's first one
are not counted (replicas outlive a proxy restart, the meter does not).
"""
from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import redis.asyncio as redis

from shared import keys

log = logging.getLogger("lukewarm.proxy")

METRIC_OF_STATE = {"running": "replica_seconds", "paused": "paused_seconds"}
# Pending seconds are kept to the millisecond: finer is noise, and it keeps Redis's floats short.
DIGITS = 3

# (version key, metric) → number of replicas in that state now.
Counts = dict[tuple[str, str], int]
# (UTC hour, version key, metric) → seconds.
Accrued = dict[tuple[int, str, str], float]


def state_counts(replicas: Iterable[Mapping[str, Any]]) -> Counts:
    """How many replicas of each version are billable in each metric (unknown states are not billed)."""
    counts: Counts = collections.Counter()
    for replica in replicas:
        metric = METRIC_OF_STATE.get(str(replica.get("state")))
        version = replica.get("version")
        if metric is not None and isinstance(version, str):
            counts[(version, metric)] += 1
    return dict(counts)


def hour_spans(start_s: float, end_s: float) -> list[tuple[int, float]]:
    """``[start_s, end_s)`` cut at UTC hour boundaries: (hour, seconds in it), in order."""
    spans = []
    t = start_s
    while t < end_s:
        hour = math.floor(t / keys.USAGE_BUCKET_S)
        cut = min(end_s, (hour + 1) * keys.USAGE_BUCKET_S)
        spans.append((hour, cut - t))
        t = cut
    return spans


def accrue(before: Counts, after: Counts, start_s: float, end_s: float) -> Accrued:
    """Seconds to credit for ``[start_s, end_s]`` (wall clock) given the counts at both ends (trapezoid)."""
    out: Accrued = {}
    if end_s <= start_s:
        return out
    spans = hour_spans(start_s, end_s)
    for pair in before.keys() | after.keys():
        weight = (before.get(pair, 0) + after.get(pair, 0)) / 2
        if weight <= 0:
            continue
        for hour, seconds in spans:
            out[(hour, *pair)] = seconds * weight
    return out


def merge(into: Accrued, more: Mapping[tuple[int, str, str], float]) -> None:
    for k, seconds in more.items():
        into[k] = into.get(k, 0.0) + seconds


def split_version_key(version_key: str) -> tuple[str, str, str, int] | None:
    """``customer/model/branch/version`` (a branch may hold ``/``) → its parts; None when malformed."""
    parts = version_key.split("/")
    if len(parts) < 4 or not parts[-1].isdigit():
        return None
    return parts[0], parts[1], "/".join(parts[2:-1]), int(parts[-1])


def increments(accrued: Accrued) -> dict[str, dict[str, float]]:
    """Pending seconds as Redis writes: usage hash key → field → seconds (rounded, zeros left out)."""
    out: dict[str, dict[str, float]] = {}
    for (hour, version_key, metric), seconds in accrued.items():
        parts = split_version_key(version_key)
        amount = round(seconds, DIGITS)
        if parts is None or amount <= 0:
            continue
        customer, model, branch, version = parts
        fields = out.setdefault(keys.usage_hour(customer, hour), {})
        field = keys.usage_field(model, branch, version, metric)
        fields[field] = fields.get(field, 0.0) + amount
    return out


class UsageMeter:
    """Accrues replica-seconds from the manager's snapshots; ``tick`` is what a test (or a Periodic) drives.

    ``tick`` never raises for Redis: a failed flush keeps the seconds for the next one.
    """

    def __init__(self, client: redis.Redis, snapshot: Callable[[], list[dict[str, Any]]], flush_every_s: float,
                 wall: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.redis = client
        self.snapshot = snapshot
        self.flush_every_s = flush_every_s
        self.wall = wall
        self.monotonic = monotonic
        self.pending: Accrued = {}
        self._last: tuple[float, Counts] | None = None
        self._last_flush = monotonic()

    def sample(self) -> None:
        """Read the replica states and accrue the time since the previous sample (the first only records)."""
        now = self.monotonic()
        counts = state_counts(self.snapshot())
        if self._last is not None:
            then, before = self._last
            end = self.wall()
            merge(self.pending, accrue(before, counts, end - (now - then), end))
        self._last = (now, counts)

    async def tick(self) -> None:
        self.sample()
        if self.monotonic() - self._last_flush >= self.flush_every_s:
            await self.flush()

    async def flush(self) -> bool:
        """Add the pending seconds to Redis in one pipeline; False (seconds kept) when Redis fails."""
        self._last_flush = self.monotonic()
        batch, self.pending = self.pending, {}
        writes = increments(batch)
        if not writes:
            return True
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key, fields in writes.items():
                    for field, amount in fields.items():
                        pipe.hincrbyfloat(key, field, amount)
                    pipe.expire(key, keys.USAGE_TTL_S)
                await pipe.execute()
        except (redis.RedisError, OSError) as exc:
            # Kept for the next flush. A connection lost after Redis applied the writes counts them twice:
            # rare, and an over-count of one flush interval is the failure we prefer to losing it.
            merge(self.pending, batch)
            log.warning("usage not written yet: %s", exc)
            return False
        return True

    async def close(self) -> None:
        """A last sample and flush at shutdown, before the replicas are stopped or left to the next start."""
        self.sample()
        await self.flush()
