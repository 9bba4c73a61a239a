"""Which proxies get new replicas of a version: a pure function of the fleet's heartbeats.

Rules, in order:
1. Wake first: a proxy holding a paused (then a stopped) replica of the version
   brings it back in ~20 ms with no new memory; these are used before any
   cold start, spread over the proxies running the fewest of the version.
2. Then start new ones, one at a time, each on the best proxy *with room*:
   - spread: when the version keeps capacity.min >= 2 ready, a proxy that
     holds none of it yet beats one that does (one host lost loses one);
   - room without evicting beats room only after evicting idle paused
     replicas of others (the proxy would do it, but it costs them a lukewarm
     start); a proxy with neither is skipped;
   - a proxy already holding the image (no pull) beats one without;
   - a CPU model stays off GPU hosts while others have room;
   - a GPU model takes the free GPU that fits it tightest (big GPUs stay
     free for big models);
   - then the most room left after the start (the scarcest of replica
     slots, memory and CPU, as a fraction of the host's): similar hosts
     share the load, and one host takes several when that is where the room is.

Room is judged from what the heartbeat reports: replica slots
(``max_replicas``), the customer's per-host quota, memory (the budget minus
live replicas' ``memory_mb``, and the host's ``memory_available_mb``), CPUs
(limits of running replicas against the host's), and free GPUs. A figure a
proxy does not report (0) is not judged by.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ingress.router import ProxyState, ReplicaState, alive

LIVE = frozenset({"starting", "running", "paused"})  # hold memory and a replica slot on the host
SERVING = frozenset({"starting", "running"})  # use CPU
# A proxy that does not report its memory budget uses this share of its RAM (its own default).
DEFAULT_BUDGET_SHARE = 0.75


@dataclasses.dataclass(frozen=True)
class Needs:
    """What one replica of the version takes on a host."""

    version: str  # customer/model/branch/number
    memory_mb: int = 512
    cpus: float = 1.0
    gpu: bool = False
    gpu_memory_mb: int = 0
    image: str = ""
    max_per_host: int = 16  # replicas of one version a proxy runs at most (1 for a GPU model)

    @property
    def customer(self) -> str:
        return self.version.split("/", 1)[0]


@dataclasses.dataclass(frozen=True)
class Placement:
    proxy_id: str
    url: str
    replicas: int  # running replicas of the version this proxy should have: ``ProxyClient.warm``'s ``replicas``
    wake: int = 0  # paused or stopped replicas woken there
    start: int = 0  # new replicas started there


@dataclasses.dataclass(frozen=True)
class _Host:
    """One proxy as placement sees it, for one version."""

    proxy: ProxyState
    serving: int  # running or starting replicas of the version
    paused: int
    stopped: int
    live: int  # live replicas of any version (slots)
    live_mb: int
    serving_cpus: float
    customer_live: int
    evictable: int  # idle paused replicas of other versions: slots and memory a start may take back
    evictable_mb: int
    customer_evictable: int
    free_gpus_mb: tuple[float, ...]  # free GPUs' free memory, smallest first (inf: not reported)
    idle_gpus_mb: tuple[float, ...]  # GPUs held by a version idle here: free after a swap

    @property
    def lukewarm(self) -> int:
        return self.paused + self.stopped

    @property
    def ready(self) -> int:
        return self.serving + self.lukewarm


def place_replicas(
    proxies: Sequence[ProxyState], needs: Needs, wake: int, start: int, spread: bool, now: float,
    max_age_s: float = 15.0, exclude: frozenset[str] = frozenset(),
) -> list[Placement]:
    """Where to wake ``wake`` lukewarm replicas and start ``start`` new ones; fewer when the fleet lacks room.

    One ``Placement`` per chosen proxy, in the order chosen.
    """
    hosts = [_host(p, needs) for p in alive(proxies, now, max_age_s) if p.proxy_id not in exclude]
    woken = _wake(hosts, wake)
    started: dict[str, int] = {}
    order = list(woken)
    for _ in range(start):
        best = _best_for_start(hosts, needs, spread, woken, started)
        if best is None:
            break  # no room left anywhere: the rest waits for a later round
        started[best.proxy.proxy_id] = started.get(best.proxy.proxy_id, 0) + 1
        if best.proxy.proxy_id not in order:
            order.append(best.proxy.proxy_id)
    by_id = {h.proxy.proxy_id: h for h in hosts}
    return [_placement(by_id[pid], woken.get(pid, 0), started.get(pid, 0)) for pid in order]


def _placement(host: _Host, woken: int, started: int) -> Placement:
    # The proxy wakes its lukewarm replicas before starting any: asked for new ones where some
    # sleep, it must be asked for those too, or the new ones would only be the old ones woken.
    running = host.serving + (host.lukewarm if started else woken) + started
    return Placement(host.proxy.proxy_id, host.proxy.url, running, wake=woken, start=started)


def _wake(hosts: list[_Host], count: int) -> dict[str, int]:
    """Lukewarm replicas to wake per proxy: paused before stopped, where the version runs least."""
    woken: dict[str, int] = {}
    for host in sorted((h for h in hosts if h.lukewarm), key=lambda h: (h.paused == 0, h.serving, h.proxy.proxy_id)):
        if count <= 0:
            break
        take = min(count, host.lukewarm)
        woken[host.proxy.proxy_id] = take
        count -= take
    return woken


def _best_for_start(hosts: list[_Host], needs: Needs, spread: bool, woken: dict[str, int],
                    started: dict[str, int]) -> _Host | None:
    ranked = []
    for host in hosts:
        k = started.get(host.proxy.proxy_id, 0)
        if host.ready + k >= needs.max_per_host:
            continue
        # What is woken there runs too: it takes CPU like a start.
        waking = woken.get(host.proxy.proxy_id, 0)
        host = dataclasses.replace(host, serving_cpus=host.serving_cpus + waking * needs.cpus)
        if _fits(host, needs, k, loose=False):
            tier = 0
        elif _fits(host, needs, k, loose=True):
            tier = 1
        else:
            continue
        sleeping = host.lukewarm - waking
        ranked.append(((
            spread and host.ready + k > 0,
            tier,
            sleeping > 0,  # a start there also wakes those: an extra wake for nothing
            needs.image not in host.proxy.images,
            not needs.gpu and bool(host.proxy.gpus),
            _gpu_waste(host, needs, tier),
            -_headroom(host, needs, k),
            host.proxy.proxy_id,
        ), host))
    return min(ranked, key=lambda r: r[0])[1] if ranked else None


def _host(proxy: ProxyState, needs: Needs) -> _Host:
    mine = [r for r in proxy.replicas if r.version == needs.version]
    live = [r for r in proxy.replicas if r.state in LIVE]
    evictable = [r for r in live if r.state == "paused" and r.in_flight == 0 and r.version != needs.version]
    prefix = needs.customer + "/"
    busy_versions = {r.version for r in proxy.replicas if r.in_flight > 0}
    free, idle = [], []
    for g in proxy.gpus:
        free_mb = float(g.memory_total_mb - g.memory_used_mb) if g.memory_total_mb else float("inf")
        if g.swapping:
            continue
        if g.version is None:
            free.append(free_mb)
        elif g.version != needs.version and g.version not in busy_versions:
            idle.append(float(g.memory_total_mb) if g.memory_total_mb else float("inf"))
    return _Host(
        proxy=proxy,
        serving=_count(mine, SERVING), paused=_count(mine, {"paused"}), stopped=_count(mine, {"stopped"}),
        live=len(live), live_mb=sum(r.memory_mb for r in live),
        serving_cpus=sum(r.cpus for r in proxy.replicas if r.state in SERVING),
        customer_live=sum(1 for r in live if r.version.startswith(prefix)),
        evictable=len(evictable), evictable_mb=sum(r.memory_mb for r in evictable),
        customer_evictable=sum(1 for r in evictable if r.version.startswith(prefix)),
        free_gpus_mb=tuple(sorted(free)), idle_gpus_mb=tuple(sorted(idle)),
    )


def _count(replicas: list[ReplicaState], states: frozenset[str] | set[str]) -> int:
    return sum(1 for r in replicas if r.state in states)


def _budget_mb(proxy: ProxyState) -> int:
    return proxy.memory_budget_mb or int(proxy.memory_mb * DEFAULT_BUDGET_SHARE)


def _quota(proxy: ProxyState) -> int:
    """The customer's live replicas a proxy allows (its own default: half its slots)."""
    return proxy.max_replicas_per_customer or max(1, proxy.max_replicas // 2)


def _fits(host: _Host, needs: Needs, placed: int, loose: bool) -> bool:
    """Whether one more new replica fits after ``placed`` (``loose``: evicting idle paused ones of others)."""
    p, n = host.proxy, placed + 1
    evict, evict_mb = (host.evictable, host.evictable_mb) if loose else (0, 0)
    if host.live + n > p.max_replicas + evict:
        return False
    if host.customer_live + n > _quota(p) + (host.customer_evictable if loose else 0):
        return False
    budget = _budget_mb(p)
    if budget and host.live_mb + n * needs.memory_mb > budget + evict_mb:
        return False
    if p.memory_available_mb and n * needs.memory_mb > p.memory_available_mb + evict_mb:
        return False
    if p.cpus and host.serving_cpus + n * needs.cpus > p.cpus:
        return False
    return not needs.gpu or len(_fitting_gpus(host, needs, loose)) >= n


def _fitting_gpus(host: _Host, needs: Needs, loose: bool) -> list[float]:
    pool = host.free_gpus_mb + (host.idle_gpus_mb if loose else ())
    return sorted(mb for mb in pool if mb >= needs.gpu_memory_mb)


def _gpu_waste(host: _Host, needs: Needs, tier: int) -> float:
    """Free GPU memory left unused by the tightest-fitting GPU (0 for a CPU model)."""
    if not needs.gpu:
        return 0.0
    fitting = _fitting_gpus(host, needs, loose=tier > 0)
    return fitting[0] - needs.gpu_memory_mb if fitting else float("inf")


def _headroom(host: _Host, needs: Needs, placed: int) -> float:
    """The scarcest resource's share left after one more start (slots, memory, CPU; higher is roomier)."""
    p, n = host.proxy, placed + 1
    shares = [(p.max_replicas - host.live - n) / max(1, p.max_replicas)]
    budget = _budget_mb(p)
    if budget:
        shares.append((budget - host.live_mb - n * needs.memory_mb) / budget)
    if p.cpus:
        # Measured load counts too: a host busy with other work makes a slower neighbour.
        shares.append((p.cpus - max(host.serving_cpus, p.load1) - n * needs.cpus) / p.cpus)
    return min(shares)
