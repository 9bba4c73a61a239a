"""The fleet's capacity loop: keeps capacity.min replicas ready and adds replicas under load.

It runs on every ingress but acts only on the one holding the ``reconciler``
lease (ingress/lease.py), so however many ingresses there are, one decides.
Each round, for every version that has capacity.min > 0 (the
``lw:capacity:floor`` index: no scan) or runs or is asked for in the
proxies' heartbeats, it counts the version's replicas fleet-wide, asks
``autoscale.desired_replicas`` what to add, asks ``placement.place_replicas``
where, and calls those proxies' ``warm`` with the number of running replicas
each should have. Those calls run as owned tasks (a cold start may take
minutes; the loop does not wait for it), count as replicas on their way
while in flight, and a proxy that fails one is left alone for that version
for a while (doubling, capped).

It never removes anything: the proxies' idle policy pauses, stops and removes
idle replicas, and this loop only makes sure that never leaves fewer than
capacity.min ready (re-warming when the fleet drops below, e.g. after a proxy
died). State for the autoscaler (recent demand) lives in memory: a new holder
starts from the present, which only means it cannot scale *down* for a window.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Sequence

import redis.asyncio as redis
from aiohttp import web

from ingress.autoscale import AutoscaleSettings, AutoscaleState, ScaleDecision, VersionStats, desired_replicas
from ingress.costs import CostBook
from ingress.lease import Lease
from ingress.placement import Needs, Placement, place_replicas
from ingress.proxy_client import ProxyClient, ProxyUnreachable
from ingress.registry import Registry
from ingress.router import ProxyState, StartCosts, alive
from ingress.view import StateView
from shared import keys
from shared.background import Periodic
from shared.errors import ApiError
from shared.messages import ChunkRequest, VersionSpec, split_version_key
from shared.settings import IngressSettings

log = logging.getLogger("lukewarm.ingress")

LEASE_NAME = "reconciler"
REDIS_TIMEOUT_S = 2.0
# A proxy that failed to warm a version is left alone for it this long, doubling per failure up to the cap.
BACKOFF_BASE_S = 2.0
BACKOFF_CAP_S = 60.0
STOP_TIMEOUT_S = 5.0
# An answered warm call counts until the proxy's heartbeat shows its result, at most this long.
ANSWER_WAIT_S = 30.0


def new_holder_id() -> str:
    """Who holds the lease, for logs and Redis: host, pid and a random tag (two ingresses, one host)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclasses.dataclass(frozen=True)
class _Pending:
    """A warm call, counted from when it is sent until the proxy's heartbeat shows its result."""

    task: asyncio.Task[None]
    replicas: int  # running replicas of the version the proxy was asked for
    answered_at: float | None = None


def fleet_stats(version: str, proxies: Iterable[ProxyState], pending: dict[str, int],
                costs: StartCosts) -> VersionStats:
    """``version`` across ``proxies``: demand, running (or starting) and lukewarm replicas.

    ``pending`` (proxy id → running replicas asked for in a warm call still in flight) counts as
    what the proxy will have: replicas on their way, woken from lukewarm ones there first.
    """
    demand = running = lukewarm = 0
    for proxy in proxies:
        mine = [r for r in proxy.replicas if r.version == version]
        serving = sum(1 for r in mine if r.state in {"running", "starting"})
        sleeping = sum(1 for r in mine if r.state in {"paused", "stopped"})
        extra = max(0, pending.get(proxy.proxy_id, 0) - serving)
        woken = min(extra, sleeping)
        running += serving + extra
        lukewarm += sleeping - woken
        demand += sum(r.in_flight for r in mine) + sum(n for v, n in proxy.waiting if v == version)
    return VersionStats(demand=demand, running=running, lukewarm=lukewarm, costs=costs)


def autoscale_settings(spec: VersionSpec, proxies: Sequence[ProxyState],
                       settings: IngressSettings) -> AutoscaleSettings:
    """The autoscaler's settings for one version: its own target and delays, within the fleet's."""
    # A version's own max_concurrency when it sets one, else what its replicas report (the hosts' setting).
    concurrency = getattr(spec, "max_concurrency", None) or max(
        (r.concurrency for p in proxies for r in p.replicas if r.version == spec.key), default=1)
    # Never hold a target longer than the version's idle timeout: the loop would wake what the
    # proxies' idle policy just paused, and the two would take turns.
    idle_s = float("inf") if spec.keep_warm else spec.idle_timeout_s
    return AutoscaleSettings(
        max_concurrency=float(concurrency),
        downscale_delay_s=min(settings.downscale_delay_s, idle_s),
        downscale_to_zero_delay_s=min(settings.downscale_to_zero_delay_s, idle_s),
        cold_start_patience=settings.cold_start_patience,
    )


def needs_of(spec: VersionSpec) -> Needs:
    return Needs(version=spec.key, memory_mb=spec.memory_mb, cpus=spec.cpus, gpu=spec.gpu,
                 gpu_memory_mb=spec.gpu_memory_mb, image=spec.image,
                 max_per_host=1 if spec.gpu else max(1, spec.capacity.max))


def active_versions(proxies: Iterable[ProxyState]) -> set[str]:
    """Versions the heartbeats show serving, starting or asked for (waiting requests)."""
    found: set[str] = set()
    for proxy in proxies:
        found.update(r.version for r in proxy.replicas if r.state in {"running", "starting"} or r.in_flight)
        found.update(v for v, n in proxy.waiting if n > 0)
    return found


class Reconciler:
    """The loop. ``run_once`` is one round (tests drive it); ``start``/``stop`` own the background loop."""

    def __init__(self, view: StateView, registry: Registry, client: ProxyClient, costs: CostBook, lease: Lease,
                 settings: IngressSettings, clock: Callable[[], float] = time.time, max_age_s: float = 15.0) -> None:
        self.view = view
        self.registry = registry
        self.client = client
        self.costs = costs
        self.lease = lease
        self.settings = settings
        self.clock = clock
        self.max_age_s = max_age_s
        self.rounds = 0  # rounds reconciled while holding the lease
        self.states: dict[str, AutoscaleState] = {}
        self.last: dict[str, ScaleDecision] = {}  # each version's latest decision, for status and tests
        self._pending: dict[tuple[str, str], _Pending] = {}  # (version, proxy id) → a warm call in flight
        self._backoff: dict[tuple[str, str], tuple[float, int]] = {}  # → (until, failures)
        self._said: dict[str, str] = {}  # the last line logged per version
        self._floor_failing = False
        self._loop: Periodic | None = None

    @property
    def holding(self) -> bool:
        return self.lease.held

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Contend for the lease and reconcile while holding it; nothing when the interval is 0."""
        if self.settings.reconcile_interval_s <= 0 or self._loop is not None:
            return
        # The lease must be renewed well within its TTL even if rounds are set further apart.
        period = min(self.settings.reconcile_interval_s, self.settings.lease_ttl_s / 3)
        self._loop = Periodic("reconciler", period, self.run_once)
        self._loop.start()

    async def stop(self) -> None:
        """Stop the loop, cancel warm calls in flight (awaited, bounded), give the lease back."""
        if self._loop is not None:
            await self._loop.stop()
            self._loop = None
        tasks = [p.task for p in self._pending.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT_S)
        self._pending.clear()
        await self.lease.release()

    # ---- one round ---------------------------------------------------------------------

    async def run_once(self) -> bool:
        """Renew or take the lease; reconcile when held. Whether this ingress reconciled."""
        if not await self.lease.hold():
            # Another decides now; what we knew of demand is stale when we get the lease back.
            self.states.clear()
            self.last.clear()
            return False
        await self.reconcile()
        self.rounds += 1
        return True

    async def reconcile(self) -> None:
        """One round over every version that keeps a floor or shows load; warm calls are launched, not awaited."""
        now = self.clock()
        proxies = alive(self.view.live_proxies(), self.view.routing_now(), self.max_age_s)
        self._forget_settled(proxies, now)
        floor = await self._floor()
        versions = set(floor) | active_versions(proxies) | {v for v, _ in self._pending}
        for key in sorted(versions):
            if not self.lease.held:
                return  # our tenure may be over: whatever is left is the next holder's
            spec = await self._spec(key)
            if spec is None or now - spec.created_at < self.settings.new_version_grace_s:
                continue
            for placement in self._decide(spec, proxies, now):
                self._launch(spec, placement)
        for gone in set(self.states) - versions:
            del self.states[gone]
            self.last.pop(gone, None)
            self._said.pop(gone, None)
        # A failure long past its rest is forgotten, so the map holds only recent trouble.
        self._backoff = {k: b for k, b in self._backoff.items() if b[0] + BACKOFF_CAP_S > now}

    def _decide(self, spec: VersionSpec, proxies: Sequence[ProxyState], now: float) -> list[Placement]:
        """What one version needs now, placed (pure, given this loop's memory)."""
        key = spec.key
        pending = {pid: p.replicas for (v, pid), p in self._pending.items() if v == key}
        stats = fleet_stats(key, proxies, pending, self.costs.costs(key))
        decision, self.states[key] = desired_replicas(
            stats, spec.capacity, autoscale_settings(spec, proxies, self.settings), now,
            self.states.get(key, AutoscaleState()))
        self.last[key] = decision
        if not decision.wake and not decision.cold:
            return []
        # A proxy with a call in flight for it already counts with what it was asked; one that failed
        # lately is given a rest.
        exclude = frozenset(pending) | {pid for (v, pid), (until, _) in self._backoff.items()
                                        if v == key and until > now}
        placements = place_replicas(proxies, needs_of(spec), decision.wake, decision.cold,
                                    spread=spec.capacity.min >= 2, now=self.view.routing_now(),
                                    max_age_s=self.max_age_s, exclude=exclude)
        where = ", ".join(f"{p.proxy_id}×{p.replicas}" for p in placements) or "no proxy with room"
        # Said once per change: a floor that cannot be met would otherwise say so every round.
        line = (f"capacity {key}: demand {stats.demand}, {stats.running} running, {stats.lukewarm} lukewarm → "
                f"{decision.reason} (wake {decision.wake}, start {decision.cold}) on {where}")
        if self._said.get(key) != line:
            self._said[key] = line
            log.info("%s", line)
        return placements

    def _forget_settled(self, proxies: Sequence[ProxyState], now: float) -> None:
        """Drop warm calls that failed, or whose result the proxy's heartbeat now shows: until then
        a call counts, or the next round, seeing an older heartbeat, would place the same replicas
        again elsewhere."""
        beats = {p.proxy_id: p.ts for p in proxies}
        kept = {}
        for (version, pid), pending in self._pending.items():
            if pending.answered_at is None:
                if pending.task.done():
                    continue  # failed (backed off) or cancelled
            elif beats.get(pid, float("inf")) >= pending.answered_at or now - pending.answered_at > ANSWER_WAIT_S:
                continue
            kept[(version, pid)] = pending
        self._pending = kept

    # ---- the edges: Redis and the proxies ------------------------------------------------

    async def _floor(self) -> dict[str, int]:
        """Versions that keep replicas ready (the index the registry maintains), with their capacity.min."""
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                raw = await self.registry.redis.hgetall(keys.CAPACITY_FLOOR)
        except (redis.RedisError, OSError, TimeoutError) as exc:
            if not self._floor_failing:  # once per outage, not every round
                log.warning("capacity: the floor index is unreachable (%s); rounds see only the heartbeats", exc)
            self._floor_failing = True
            return {}
        self._floor_failing = False
        return {(k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in raw.items()}

    async def _spec(self, key: str) -> VersionSpec | None:
        """The version (the view's cache, read on a miss), or None when gone, retired or unreadable."""
        try:
            customer, model, branch, number = split_version_key(key)
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                return await self.view.version(customer, model, branch, number)
        except (ApiError, TimeoutError):
            return None

    def _launch(self, spec: VersionSpec, placement: Placement) -> None:
        chunk = ChunkRequest(spec=spec, inputs=[], timeout_s=self.settings.warm_timeout_s,
                             request_id=f"reconcile-{self.lease.epoch}")
        task = asyncio.create_task(self._warm(spec.key, placement, chunk),
                                   name=f"warm-{spec.key}-{placement.proxy_id}")
        self._pending[(spec.key, placement.proxy_id)] = _Pending(task, placement.replicas)

    async def _warm(self, key: str, placement: Placement, chunk: ChunkRequest) -> None:
        """One warm call; a failure backs the proxy off for this version (logged, never raised)."""
        try:
            await self.client.warm(placement.url, chunk, replicas=placement.replicas)
        except (ProxyUnreachable, ApiError) as exc:
            _, failures = self._backoff.get((key, placement.proxy_id), (0.0, 0))
            wait_s = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** failures)
            self._backoff[(key, placement.proxy_id)] = (self.clock() + wait_s, failures + 1)
            log.warning("capacity %s: %s could not warm %d replicas (%s); not asked again for %.0f s",
                        key, placement.proxy_id, placement.replicas, exc, wait_s)
            return
        self._backoff.pop((key, placement.proxy_id), None)
        pending = self._pending.get((key, placement.proxy_id))
        if pending is not None and pending.task is asyncio.current_task():
            self._pending[(key, placement.proxy_id)] = dataclasses.replace(pending, answered_at=self.clock())


RECONCILER = web.AppKey("reconciler", Reconciler)
