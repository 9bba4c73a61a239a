"""Which proxies run a request: a pure function of (snapshot, request, now).

Ranking is by expected latency: the start cost of the tier the proxy offers
for this version (warm < lukewarm < cold, measured per version) plus the
queue wait in front of it. Ties go to power-of-two choices on load, so that
equal proxies share work without herding.

What a heartbeat says is read for what it means for the next request:

- the queue in front of a warm replica counts the requests waiting at the
  proxy for a slot, not only the slots taken (``in_flight`` never exceeds a
  replica's concurrency: twenty queued requests are not one);
- a replica still starting is half a cold start away on average, plus the
  requests already waiting for it: cheaper than a host without the model,
  where a concurrent request would start a second replica of it;
- a host's load (for the cold-start penalty and for power-of-two choices)
  counts its waiting requests and the replicas it is starting, so that cold
  starts do not herd onto the host already busiest starting.
"""
from __future__ import annotations

import dataclasses
import operator
import random
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from shared.messages import ProxyHeartbeat, ReplicaReport

WARM, LUKEWARM, COLD = "warm", "lukewarm", "cold"


class ReplicaState(NamedTuple):
    """One replica as a heartbeat reports it. A tuple, not a frozen dataclass: the view builds one per
    replica per heartbeat (16 every 2 s per proxy) at a fifth of a frozen dataclass's cost, and compares
    and reuses them as the tuples they are (``ingress.view._reuse``)."""

    version: str
    state: str  # starting | running | paused | stopped
    in_flight: int
    concurrency: int
    # What it holds of the host, for placement: its memory limit, CPU limit, and whether it is a GPU model.
    memory_mb: int = 0
    cpus: float = 1.0
    gpu: bool = False


@dataclasses.dataclass(frozen=True)
class GpuState:
    """One GPU of a proxy: NVML's memory figures (0 when unknown) and the version holding it, if any."""

    uuid: str
    memory_total_mb: int = 0
    memory_used_mb: int = 0
    version: str | None = None
    swapping: bool = False


_COLD = ""  # ProxyState._prices' key for the cold offer


@dataclasses.dataclass(frozen=True, slots=True)
class ProxyState:
    """A proxy as its last heartbeat described it.

    Slots, not a ``__dict__``: a decision reads a few fields of each of its candidates, and at 5000 proxies
    those are spread over a view too big for the CPU's caches (a field behind an instance dict is one more
    object to reach)."""

    proxy_id: str
    url: str
    epoch: int
    ts: float
    replicas: tuple[ReplicaState, ...] = ()
    max_replicas: int = 16
    images: frozenset[str] = frozenset()
    # Host capacity, for placement (0: not reported, and then not judged by). Like the replicas'
    # placement fields, left out of equality: routing compares proxies by what it always did.
    cpus: float = dataclasses.field(default=0.0, compare=False)
    load1: float = dataclasses.field(default=0.0, compare=False)
    memory_mb: int = dataclasses.field(default=0, compare=False)
    memory_available_mb: int = dataclasses.field(default=0, compare=False)
    memory_budget_mb: int = dataclasses.field(default=0, compare=False)
    max_replicas_per_customer: int = dataclasses.field(default=0, compare=False)
    gpus: tuple[GpuState, ...] = dataclasses.field(default=(), compare=False)
    # Requests waiting at this proxy for a replica slot, per version key: load beyond what runs.
    waiting: tuple[tuple[str, int], ...] = dataclasses.field(default=(), compare=False)
    # Derived once per heartbeat, on first use (a heartbeat is read by every request routed until the next
    # one: routing a request costs a few dict lookups per candidate, not a pass over its replicas). None:
    # not worked out yet.
    _load: int | None = dataclasses.field(default=None, init=False, repr=False, compare=False)
    _by_version: dict[str, tuple[ReplicaState, ...]] | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False)
    _waiting_of: dict[str, int] | None = dataclasses.field(default=None, init=False, repr=False, compare=False)
    _offers: dict[str, tuple[str, float]] | None = dataclasses.field(default=None, init=False, repr=False,
                                                                     compare=False)
    _prices: dict[str, tuple[StartCosts, float, str, float]] | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False)

    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self.replicas)

    @property
    def load(self) -> int:
        """Work here now or about to be: slots taken, requests waiting for one, and replicas starting."""
        load = self._load
        if load is None:
            load = self.in_flight + sum(n for _, n in self.waiting) + sum(1 for r in self.replicas
                                                                          if r.state == "starting")
            object.__setattr__(self, "_load", load)
        return load

    @property
    def by_version(self) -> dict[str, tuple[ReplicaState, ...]]:
        """This proxy's replicas of each version."""
        found = self._by_version
        if found is None:
            out: dict[str, list[ReplicaState]] = {}
            for r in self.replicas:
                out.setdefault(r.version, []).append(r)
            found = {v: tuple(rs) for v, rs in out.items()}
            object.__setattr__(self, "_by_version", found)
        return found

    def inherit(self, held: "ProxyState") -> None:
        """Take over what ``held`` (this proxy's previous heartbeat) already worked out and this one would
        work out the same: its per-version tuples for the versions whose replicas are the same objects
        (the view keeps every replica object a beat repeats). A fresh heartbeat otherwise rebuilds them on
        the first request routed over it: a dict and a tuple per version held, every 2 s per proxy, for
        the collector to walk (shared/heap.py)."""
        old = held._by_version
        if old is None:
            return
        if self.replicas is held.replicas:
            object.__setattr__(self, "_by_version", old)
            return
        fresh = self.by_version  # worked out here; the tuples repeated are swapped for the held ones
        for version, rs in fresh.items():
            prev = old.get(version)
            if prev is not None and len(prev) == len(rs) and all(a is b for a, b in zip(prev, rs)):
                fresh[version] = prev

    def holds(self, version: str) -> bool:
        """A replica of ``version`` here in any state, or requests waiting for one (the first waiter of a
        version starts one at once, before the heartbeat can show it): more than a bare cold start."""
        return version in self.by_version or bool(self.waiting and self.waiting_for(version))

    def waiting_for(self, version: str) -> int:
        """Requests waiting here for a slot on a replica of ``version``."""
        found = self._waiting_of
        if found is None:
            found = dict(self.waiting)
            object.__setattr__(self, "_waiting_of", found)
        return found.get(version, 0)

    def price(self, version: str, costs: StartCosts) -> tuple[float, str, float]:
        """``tier_and_wait`` as (ms rounded for ranking, tier, ms), worked out once per heartbeat for the versions
        this proxy holds or is waited for at the same ``costs`` object (``ingress.costs.CostBook`` keeps one per
        version until a sample changes it): a popular version's holders are ranked by every request routed to
        it. A cold offer depends on the host and the costs only, and is kept in one slot, not per version: cold
        candidates are sampled at random, so a per-version entry would rarely be read again."""
        # Flat entries (costs, rounded, tier, ms): one object fewer to reach per candidate, in a view too big
        # for the CPU's caches.
        prices = self._prices
        if prices is None:
            prices = {}
            object.__setattr__(self, "_prices", prices)
        hit = prices.get(version)
        if hit is not None and hit[0] is costs:
            return hit[1:]  # type: ignore[return-value]
        held = self.holds(version)
        cold = prices.get(_COLD)  # no version key is empty
        if cold is not None and cold[0] is costs and not held:
            return cold[1:]  # type: ignore[return-value]
        tier, ms = tier_and_wait(self, version, costs)
        entry = (costs, round(ms, 3), tier, ms)
        prices[version if held else _COLD] = entry
        return entry[1:]  # type: ignore[return-value]

    def offer(self, version: str) -> tuple[str, float]:
        """``offer`` for a version held or waited for here, worked out once per heartbeat (prices are applied
        per request)."""
        offers = self._offers
        if offers is None:
            offers = {}
            object.__setattr__(self, "_offers", offers)
        found = offers.get(version)
        if found is None:
            found = offers[version] = offer(self.by_version.get(version, ()), self.waiting_for(version))
        return found

    @classmethod
    def from_heartbeat(cls, data: dict[str, Any]) -> "ProxyState":
        """From a heartbeat as Redis holds it (``shared.messages.ProxyHeartbeat``); raises when malformed."""
        beat = ProxyHeartbeat.from_dict(data, replicas=False)
        cap = beat.capacity
        return cls(
            proxy_id=beat.proxy_id, url=beat.url, epoch=beat.epoch, ts=beat.ts,
            # Positional, and no ReplicaReport between: heartbeats are parsed by the thousand on every poll.
            replicas=tuple([_replica(ReplicaState, ReplicaReport.routing_fields(r))
                            for r in data.get("replicas") or ()]),
            max_replicas=cap.max_replicas, images=frozenset(beat.images), cpus=cap.cpus, load1=cap.load1,
            memory_mb=cap.memory_mb, memory_available_mb=cap.memory_available_mb,
            memory_budget_mb=cap.memory_budget_mb, max_replicas_per_customer=cap.max_replicas_per_customer,
            gpus=tuple(_gpu(g) for g in beat.gpus if g.get("uuid")),
            waiting=tuple(beat.waiting.items()),
        )


# ReplicaState(*fields) without the Python frame of a NamedTuple's __new__ (routing_fields gives all seven).
_replica = tuple.__new__


def _gpu(data: dict[str, Any]) -> GpuState:
    # NVML figures are None while the driver has not answered yet: unknown, not a malformed heartbeat.
    version = data.get("version")
    return GpuState(uuid=str(data["uuid"]), memory_total_mb=int(data.get("memory_total_mb") or 0),
                    memory_used_mb=int(data.get("memory_used_mb") or 0),
                    version=str(version) if version else None, swapping=bool(data.get("swapping")))


@dataclasses.dataclass(frozen=True)
class StartCosts:
    """Expected start cost of a version per tier, in ms (moving averages, or defaults)."""

    lukewarm_ms: float = 25.0  # a paused replica thawed
    cold_ms: float = 400.0
    infer_ms: float = 5.0
    stopped_ms: float = 320.0  # a stopped replica started again: docker start and the model's load


class Choice(NamedTuple):
    """A candidate as ranked: a tuple, not a frozen dataclass, because a decision makes one per candidate
    (a frozen dataclass's ``__init__`` costs three times as much)."""

    proxy: ProxyState
    tier: str
    expected_ms: float


def tier_and_wait(proxy: ProxyState, version: str, costs: StartCosts) -> tuple[str, float]:
    """The best tier this proxy offers for ``version`` and its expected latency (ms)."""
    # A version held here (ProxyState.holds); a bare cold start otherwise.
    if proxy.holds(version):
        kind, units = proxy.offer(version)
        if kind == "warm":
            return WARM, units * costs.infer_ms
        if kind == "paused":
            return LUKEWARM, costs.lukewarm_ms
        if kind == "stopped":
            # Lukewarm too, but a boot and the model's load, not a thaw: priced apart, or a stopped host would
            # beat a warm replica with a short queue and pay a start the queue would have spared.
            return LUKEWARM, costs.stopped_ms
        if kind == "starting":
            return COLD, costs.cold_ms / 2 + units * costs.infer_ms
    # A cold start on a busy host competes for its CPU with what already runs or starts there.
    load_penalty = proxy.load * costs.infer_ms
    full = len(proxy.replicas) >= proxy.max_replicas
    return COLD, costs.cold_ms + load_penalty + (costs.cold_ms if full else 0.0)


def offer(replicas: Sequence[ReplicaState], waiting: int) -> tuple[str, float]:
    """What one host offers a request of a version it holds ``replicas`` of, with ``waiting`` requests queued
    there, as (kind, units): ``warm`` (units: inference times to wait for a slot), ``paused``, ``stopped``,
    ``starting`` (units: inference times of the requests ahead once the start is done) or ``cold``."""
    running = [r for r in replicas if r.state == "running"]
    if running:
        return "warm", warm_queue(running, waiting)
    if any(r.state == "paused" for r in replicas):
        return "paused", 0.0
    if any(r.state == "stopped" for r in replicas):
        return "stopped", 0.0
    starting = sum(max(1, r.concurrency) for r in replicas if r.state == "starting")
    if starting or waiting:
        # A start under way here: on average half of it is left, and the requests waiting for it go first.
        return "starting", max(0, waiting - max(1, starting) + 1) / max(1, starting)
    return "cold", 0.0


def warm_queue(running: Sequence[ReplicaState], waiting: int) -> float:
    """Inference times a new request waits for a slot on ``running`` (one version's running replicas on one
    host) with ``waiting`` requests already queued there: 0 when a slot is free and nobody waits."""
    if not waiting:
        best = min(running, key=lambda r: r.in_flight / max(1, r.concurrency))
        return max(0, best.in_flight - best.concurrency + 1) / max(1, best.concurrency)
    slots = sum(max(1, r.concurrency) for r in running)
    return max(0, sum(r.in_flight for r in running) + waiting - slots + 1) / slots


def alive(proxies: Iterable[ProxyState], now: float, max_age_s: float) -> list[ProxyState]:
    return [p for p in proxies if now - p.ts <= max_age_s]


def choose_proxies(
    proxies: Sequence[ProxyState], version: str, now: float, rng: random.Random,
    costs: StartCosts = StartCosts(), max_age_s: float = 15.0, exclude: frozenset[str] = frozenset(),
) -> list[Choice]:
    """Every live proxy not excluded, best first.

    Among equal expected latencies the order comes from power-of-two
    choices: two random candidates are compared on load (``ProxyState.load``)
    and the lighter goes first, repeated until none are left.
    """
    scored = []
    for p in proxies:
        if now - p.ts > max_age_s or (exclude and p.proxy_id in exclude):
            continue
        key, tier, ms = p.price(version, costs)
        scored.append((key, _choice(Choice, (p, tier, ms))))
    if len(scored) < 2:
        return [c for _, c in scored]
    scored.sort(key=_KEY)
    # Runs of equal expected latency, each ordered by power-of-two choices (groupby, without its lambdas).
    ordered: list[Choice] = []
    group: list[Choice] = []
    key = scored[0][0]
    for k, c in scored:
        if k != key:
            if len(group) > 1:
                ordered.extend(_power_of_two(group, rng))
            else:
                ordered.append(group[0])
            group, key = [], k
        group.append(c)
    ordered.extend(_power_of_two(group, rng))
    return ordered


_KEY = operator.itemgetter(0)
# Choice(p, tier, ms) without the Python frame of a NamedTuple's __new__: one per candidate per decision.
_choice = tuple.__new__


def _power_of_two(pool: list[Choice], rng: random.Random) -> list[Choice]:
    if len(pool) < 2:
        return pool
    out: list[Choice] = []
    while len(pool) > 1:
        # Two distinct candidates drawn uniformly (what rng.sample(range(n), 2) draws, for less).
        n = len(pool)
        a = int(rng.random() * n)
        b = int(rng.random() * (n - 1))
        b += b >= a
        pick = a if pool[a].proxy.load <= pool[b].proxy.load else b
        out.append(pool.pop(pick))
    out.extend(pool)
    return out
