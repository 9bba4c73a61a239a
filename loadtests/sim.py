"""Trace-driven simulation: the real proxy chooser against random and least-loaded routing.

Pure Python, no Redis, Docker or network. One trace (Poisson arrivals over
Zipf-popular models, lognormal inference times) is replayed through a
discrete-event model of a fleet once per routing policy:

- ``lukewarm``: ``ingress.router.choose_proxies`` fed the snapshot an ingress
  sees (each host's replicas with state and in-flight, ``ts=now``) and
  ``StartCosts`` of the measured start figures and the model's mean time;
- ``least_loaded``: the host with the fewest requests in flight;
- ``random``: a host picked uniformly;
- ``consistent_hash``: consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018): the
  model's first host on a hash ring whose load is within 1.25× the mean, else the next;
- ``multiplex``: model-locality routing as in Ray Serve's model multiplexing: among the hosts holding a
  replica of the model and below twice the mean load, the less loaded of two picked at random; with none,
  the same over all hosts.

The proxy side is the same for every policy and uses the proxy's own rules
(``runtime_proxy.policy``): a host holds at most ``max_replicas`` replicas,
one per model; a running replica idle for ``idle_timeout`` is paused
(lukewarm); a request for a model the host has no replica of creates one
(cold), evicting the least recently used paused replica when full, else the
least recently used idle running one (when every replica is busy the host
goes over its limit, counted as ``overflow``). A replica runs one request at
a time, FIFO; a running request also needs one of the host's cores.

Time is in milliseconds throughout. Metrics skip the first ``--warmup``
fraction of the trace (fleet filling up from empty).

    python -m loadtests.sim [--seed N] [--requests N] [--cold-ms 340] ...
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import heapq
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from ingress.router import ProxyState, ReplicaState, StartCosts, choose_proxies
from runtime_proxy.policy import ReplicaView, replicas_to_evict, replicas_to_pause

POLICIES = ("lukewarm", "least_loaded", "random", "consistent_hash", "multiplex")
BASELINES = POLICIES[1:]
# Bounded loads: a host takes a model's request while its load is at most this × the mean (+1).
HASH_LOAD_FACTOR = 1.25
HASH_VNODES = 64
WARM, LUKEWARM, COLD = "warm", "lukewarm", "cold"

# ---- configuration and trace -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    models: int = 100
    zipf_s: float = 1.1
    hosts: int = 8
    max_replicas: int = 12
    cores: int = 4  # per host: requests running at once on a host
    utilisation: float = 0.6  # offered load / (hosts * cores); sets the arrival rate
    infer_ms: float = 20.0  # median of the models' mean inference times
    model_sigma: float = 0.25  # spread of the per-model means (lognormal); wider makes the top model
    # (23 % of requests) need more than one replica per host on some seeds, for every policy
    request_sigma: float = 0.3  # spread of one model's request times around its mean (lognormal)
    idle_timeout_ms: float = 2000.0
    cold_ms: float = 340.0  # PERFORMANCE.md: create + start -> first answer
    lukewarm_ms: float = 20.0  # PERFORMANCE.md: unpause -> first answer
    warm_ms: float = 0.2  # PERFORMANCE.md: warm request over the container's socket
    warmup: float = 0.1  # fraction of the trace left out of the metrics


@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    share: float  # probability that a request is for this model
    mean_ms: float  # mean inference time


@dataclasses.dataclass(frozen=True)
class Arrival:
    index: int
    at_ms: float
    model: int
    infer_ms: float


def make_models(cfg: Config, rng: random.Random) -> list[Model]:
    weights = [1.0 / (k ** cfg.zipf_s) for k in range(1, cfg.models + 1)]
    total = sum(weights)
    return [Model(name=f"m{k:03d}", share=w / total, mean_ms=cfg.infer_ms * rng.lognormvariate(0.0, cfg.model_sigma))
            for k, w in enumerate(weights)]


def arrival_rate_per_ms(cfg: Config, models: Sequence[Model]) -> float:
    mean_ms = sum(m.share * m.mean_ms for m in models)
    return cfg.utilisation * cfg.hosts * cfg.cores / mean_ms


def make_trace(cfg: Config, models: Sequence[Model], n: int, rng: random.Random) -> list[Arrival]:
    """Poisson arrivals; each request's time is lognormal with its model's mean."""
    rate = arrival_rate_per_ms(cfg, models)
    shares = [m.share for m in models]
    picks = rng.choices(range(len(models)), weights=shares, k=n)
    mu_shift = -cfg.request_sigma ** 2 / 2  # so that E[time] == the model's mean
    trace, t = [], 0.0
    for i, m in enumerate(picks):
        t += rng.expovariate(rate)
        infer = models[m].mean_ms * rng.lognormvariate(mu_shift, cfg.request_sigma)
        trace.append(Arrival(index=i, at_ms=t, model=m, infer_ms=infer))
    return trace


# ---- fleet entities ----------------------------------------------------------


@dataclasses.dataclass
class Request:
    arrival: Arrival
    host: int = -1
    tier: str = ""
    done_ms: float = math.nan

    @property
    def latency_ms(self) -> float:
        return self.done_ms - self.arrival.at_ms


@dataclasses.dataclass
class Replica:
    uid: int
    model: int
    state: str  # starting | running | paused
    last_used: float
    starting_tier: str = ""  # cold or lukewarm while state == starting
    queue: collections.deque[Request] = dataclasses.field(default_factory=collections.deque)
    busy: bool = False  # one request is on a core (or waiting for one)

    @property
    def in_flight(self) -> int:
        return len(self.queue) + (1 if self.busy else 0)


@dataclasses.dataclass
class Host:
    index: int
    cores: int
    max_replicas: int
    replicas: dict[int, Replica] = dataclasses.field(default_factory=dict)  # model -> replica
    running: int = 0  # requests on a core
    run_queue: collections.deque[tuple[Replica, Request]] = dataclasses.field(default_factory=collections.deque)
    snapshot: ProxyState | None = None  # cached heartbeat, dropped on any change

    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self.replicas.values())


@dataclasses.dataclass
class Counters:
    created: int = 0
    created_dup: int = 0  # while another host was still starting a replica of the same model
    unpaused: int = 0
    paused: int = 0
    evicted: int = 0
    overflow: int = 0
    busy_core_ms: float = 0.0


@dataclasses.dataclass
class Fleet:
    cfg: Config
    models: list[Model]
    hosts: list[Host]
    events: list[tuple[float, int, str, Any]] = dataclasses.field(default_factory=list)
    seq: int = 0
    next_uid: int = 0
    counters: Counters = dataclasses.field(default_factory=Counters)

    def schedule(self, at_ms: float, kind: str, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at_ms, self.seq, kind, payload))


def new_fleet(cfg: Config, models: list[Model]) -> Fleet:
    return Fleet(cfg=cfg, models=models,
                 hosts=[Host(index=i, cores=cfg.cores, max_replicas=cfg.max_replicas) for i in range(cfg.hosts)])


# ---- what an ingress sees ----------------------------------------------------


def proxy_state(host: Host, now: float) -> ProxyState:
    """The host as its heartbeat would describe it, fresh (``ts=now``)."""
    if host.snapshot is None:
        host.snapshot = ProxyState(
            proxy_id=str(host.index), url=f"http://host{host.index}:8081", epoch=1, ts=now,
            replicas=tuple(ReplicaState(version=f"m{r.model:03d}", state=r.state, in_flight=r.in_flight,
                                        concurrency=1) for r in host.replicas.values()),
            max_replicas=host.max_replicas,
        )
    return dataclasses.replace(host.snapshot, ts=now)


def view(r: Replica, idle_timeout_ms: float) -> ReplicaView:
    # The policy only compares differences of times, so milliseconds work as its unit.
    return ReplicaView(replica_id=str(r.uid), version_key=f"m{r.model:03d}", state=r.state, in_flight=r.in_flight,
                       last_used=r.last_used, idle_timeout_s=idle_timeout_ms, keep_warm=False, memory_mb=0)


# ---- routing policies: (fleet, request, now, rng) -> host index --------------

Policy = Callable[[Fleet, Request, float, random.Random], int]


def route_lukewarm(fleet: Fleet, req: Request, now: float, rng: random.Random) -> int:
    model = fleet.models[req.arrival.model]
    costs = StartCosts(lukewarm_ms=fleet.cfg.lukewarm_ms, cold_ms=fleet.cfg.cold_ms, infer_ms=model.mean_ms)
    proxies = [proxy_state(h, now) for h in fleet.hosts]
    choices = choose_proxies(proxies, model.name, now, rng, costs)
    return int(choices[0].proxy.proxy_id)


def route_least_loaded(fleet: Fleet, req: Request, now: float, rng: random.Random) -> int:
    return min(fleet.hosts, key=lambda h: (h.in_flight, rng.random())).index


def route_random(fleet: Fleet, req: Request, now: float, rng: random.Random) -> int:
    return rng.randrange(len(fleet.hosts))


def _ring(hosts: int) -> list[tuple[int, int]]:
    points = [(_hash(f"host{h}#{v}"), h) for h in range(hosts) for v in range(HASH_VNODES)]
    return sorted(points)


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


_RINGS: dict[int, list[tuple[int, int]]] = {}


def route_consistent_hash(fleet: Fleet, req: Request, now: float, rng: random.Random) -> int:
    ring = _RINGS.get(len(fleet.hosts)) or _RINGS.setdefault(len(fleet.hosts), _ring(len(fleet.hosts)))
    key = _hash(fleet.models[req.arrival.model].name)
    total = sum(h.in_flight for h in fleet.hosts) + 1
    cap = math.ceil(HASH_LOAD_FACTOR * total / len(fleet.hosts))
    start = next((i for i, (point, _) in enumerate(ring) if point >= key), 0)
    seen: set[int] = set()
    for i in range(len(ring)):
        host = ring[(start + i) % len(ring)][1]
        if host in seen:
            continue
        seen.add(host)
        if fleet.hosts[host].in_flight < cap:
            return host
    return ring[start][1]


def _two_choices(hosts: Sequence[Host], rng: random.Random) -> int:
    if len(hosts) == 1:
        return hosts[0].index
    a, b = rng.sample(list(hosts), 2)
    return (a if a.in_flight <= b.in_flight else b).index


def route_multiplex(fleet: Fleet, req: Request, now: float, rng: random.Random) -> int:
    # Like Ray Serve: a replica that has the model loaded, unless those are all saturated (twice the
    # mean load), then any replica by two choices (it loads the model, evicting its LRU one).
    limit = 2 * max(1.0, sum(h.in_flight for h in fleet.hosts) / len(fleet.hosts))
    holding = [h for h in fleet.hosts if req.arrival.model in h.replicas and h.in_flight < limit]
    return _two_choices(holding or fleet.hosts, rng)


ROUTERS: dict[str, Policy] = {"lukewarm": route_lukewarm, "least_loaded": route_least_loaded, "random": route_random,
                              "consistent_hash": route_consistent_hash, "multiplex": route_multiplex}

# ---- the proxy side, identical for every policy ------------------------------


def make_room(fleet: Fleet, host: Host) -> None:
    """Evict so that one more replica fits: the proxy's LRU rule, then an idle running one."""
    views = [view(r, fleet.cfg.idle_timeout_ms) for r in host.replicas.values()]
    doomed = set(replicas_to_evict(views, memory_budget_mb=0, max_replicas=host.max_replicas, incoming_mb=1))
    if len(host.replicas) - len(doomed) >= host.max_replicas:
        idle = [r for r in host.replicas.values() if r.state == "running" and r.in_flight == 0
                and str(r.uid) not in doomed]
        if idle:
            doomed.add(str(min(idle, key=lambda r: r.last_used).uid))
        else:
            fleet.counters.overflow += 1
    for model, r in list(host.replicas.items()):
        if str(r.uid) in doomed:
            del host.replicas[model]
            fleet.counters.evicted += 1


def start_replica(fleet: Fleet, host: Host, replica: Replica, tier: str, now: float) -> None:
    replica.state, replica.starting_tier = "starting", tier
    fleet.schedule(now + (fleet.cfg.cold_ms if tier == COLD else fleet.cfg.lukewarm_ms), "ready", (host, replica))


def create_replica(fleet: Fleet, host: Host, model: int, now: float) -> Replica:
    """A cold start of ``model`` on ``host``, after making room."""
    if len(host.replicas) >= host.max_replicas:
        make_room(fleet, host)
    starting_elsewhere = any(r.state == "starting" for h in fleet.hosts for r in [h.replicas.get(model)] if r)
    fleet.counters.created += 1
    fleet.counters.created_dup += starting_elsewhere
    fleet.next_uid += 1
    replica = Replica(uid=fleet.next_uid, model=model, state="starting", last_used=now)
    host.replicas[model] = replica
    start_replica(fleet, host, replica, COLD, now)
    return replica


def admit(fleet: Fleet, host: Host, req: Request, now: float) -> None:
    """A request reaches ``host``: use, unpause or create its model's replica there."""
    replica = host.replicas.get(req.arrival.model)
    if replica is None:
        replica = create_replica(fleet, host, req.arrival.model, now)
    elif replica.state == "paused":
        fleet.counters.unpaused += 1
        start_replica(fleet, host, replica, LUKEWARM, now)
    req.host = host.index
    req.tier = replica.starting_tier if replica.state == "starting" else WARM
    replica.queue.append(req)
    host.snapshot = None
    dispatch(fleet, host, replica, now)


def dispatch(fleet: Fleet, host: Host, replica: Replica, now: float) -> None:
    """Hand the replica's next request to a core (FIFO per replica, then FIFO per host)."""
    if replica.state != "running" or replica.busy or not replica.queue:
        return
    replica.busy = True
    host.run_queue.append((replica, replica.queue.popleft()))
    run_next(fleet, host, now)


def run_next(fleet: Fleet, host: Host, now: float) -> None:
    while host.running < host.cores and host.run_queue:
        replica, req = host.run_queue.popleft()
        host.running += 1
        duration = req.arrival.infer_ms + (fleet.cfg.warm_ms if req.tier == WARM else 0.0)
        fleet.counters.busy_core_ms += duration
        fleet.schedule(now + duration, "done", (host, replica, req))


def on_ready(fleet: Fleet, host: Host, replica: Replica, now: float) -> None:
    replica.state, replica.starting_tier, replica.last_used = "running", "", now
    host.snapshot = None
    dispatch(fleet, host, replica, now)


def on_done(fleet: Fleet, host: Host, replica: Replica, req: Request, now: float) -> None:
    req.done_ms = now
    host.running -= 1
    replica.busy, replica.last_used = False, now
    host.snapshot = None
    dispatch(fleet, host, replica, now)
    run_next(fleet, host, now)
    if replica.in_flight == 0:
        fleet.schedule(now + fleet.cfg.idle_timeout_ms, "idle", (host, replica))


def on_idle(fleet: Fleet, host: Host, replica: Replica, now: float) -> None:
    """An idle timer fired: pause the replica if the proxy's rule says so (and it still exists)."""
    if host.replicas.get(replica.model) is not replica:
        return
    if replicas_to_pause([view(replica, fleet.cfg.idle_timeout_ms)], now):
        replica.state = "paused"
        fleet.counters.paused += 1
        host.snapshot = None


# ---- one run -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Result:
    policy: str
    total: int  # every request of the trace
    total_completed: int
    requests: int  # measured (after warm-up)
    completed: int
    start_fraction: float
    cold_fraction: float
    lukewarm_fraction: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    counters: Counters
    utilisation: float


def simulate(cfg: Config, models: list[Model], trace: Sequence[Arrival], policy: str, seed: int) -> Result:
    fleet = new_fleet(cfg, models)
    route = ROUTERS[policy]
    rng = random.Random(f"{seed}:{policy}")
    requests = [Request(arrival=a) for a in trace]
    for req in requests:
        fleet.schedule(req.arrival.at_ms, "arrive", req)
    end = 0.0
    while fleet.events:
        now, _, kind, payload = heapq.heappop(fleet.events)
        if kind == "arrive":
            admit(fleet, fleet.hosts[route(fleet, payload, now, rng)], payload, now)
        elif kind == "ready":
            on_ready(fleet, *payload, now)
        elif kind == "done":
            on_done(fleet, *payload, now)
            end = now
        elif kind == "idle":
            on_idle(fleet, *payload, now)
    return summarise(cfg, policy, requests, fleet.counters, end)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def summarise(cfg: Config, policy: str, requests: Sequence[Request], counters: Counters, end_ms: float) -> Result:
    measured = requests[int(len(requests) * cfg.warmup):]
    done = [r for r in measured if not math.isnan(r.done_ms)]
    n = max(1, len(measured))
    cold = sum(r.tier == COLD for r in measured)
    luke = sum(r.tier == LUKEWARM for r in measured)
    lat = sorted(r.latency_ms for r in done)
    return Result(
        policy=policy, total=len(requests), total_completed=sum(not math.isnan(r.done_ms) for r in requests),
        requests=len(measured), completed=len(done),
        start_fraction=(cold + luke) / n, cold_fraction=cold / n, lukewarm_fraction=luke / n,
        p50_ms=percentile(lat, 50), p99_ms=percentile(lat, 99), mean_ms=sum(lat) / max(1, len(lat)),
        counters=counters, utilisation=counters.busy_core_ms / max(1e-9, end_ms * cfg.hosts * cfg.cores),
    )


def run_all(cfg: Config, seed: int, n: int) -> dict[str, Result]:
    rng = random.Random(seed)
    models = make_models(cfg, rng)
    trace = make_trace(cfg, models, n, rng)
    return {p: simulate(cfg, models, trace, p, seed) for p in POLICIES}


# ---- output ------------------------------------------------------------------


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def result_json(cfg: Config, seed: int, n: int, results: dict[str, Result]) -> dict[str, Any]:
    def per(attr: str) -> dict[str, float]:
        return {p: getattr(results[p], attr) for p in POLICIES}

    sf = per("start_fraction")
    return {
        "bench": "sim", "seed": seed, "requests": n,
        "start_fraction": sf, "p50_ms": per("p50_ms"), "p99_ms": per("p99_ms"),
        "ratio_vs_least_loaded": ratio(sf["lukewarm"], sf["least_loaded"]),
        "ratio_vs_random": ratio(sf["lukewarm"], sf["random"]),
        # Against the strongest baseline: the one with the fewest starts.
        "ratio_vs_best_baseline": ratio(sf["lukewarm"], min(sf[p] for p in BASELINES)),
        "best_baseline": min(BASELINES, key=lambda p: sf[p]),
        "cold_fraction": per("cold_fraction"), "lukewarm_fraction": per("lukewarm_fraction"),
        "utilisation": per("utilisation"),
        "config": dataclasses.asdict(cfg),
    }


def table(results: dict[str, Result]) -> list[list[Any]]:
    rows: list[list[Any]] = [["policy", "start frac", "cold", "lukewarm", "p50 ms", "p99 ms", "mean ms",
                              "created", "dup", "unpaused", "evicted", "overflow", "util"]]
    for p in POLICIES:
        r, c = results[p], results[p].counters
        rows.append([p, r.start_fraction, r.cold_fraction, r.lukewarm_fraction, r.p50_ms, r.p99_ms, r.mean_ms,
                     c.created, c.created_dup, c.unpaused, c.evicted, c.overflow, r.utilisation])
    return rows


def report(rows: list[list[Any]], result: dict[str, Any]) -> None:
    from loadtests.common import report as common_report

    common_report(rows, result)


def main(argv: list[str] | None = None) -> None:
    d = Config()
    parser = argparse.ArgumentParser(prog="python -m loadtests.sim", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--cold-ms", type=float, default=d.cold_ms)
    parser.add_argument("--lukewarm-ms", type=float, default=d.lukewarm_ms)
    parser.add_argument("--warm-ms", type=float, default=d.warm_ms)
    parser.add_argument("--models", type=int, default=d.models)
    parser.add_argument("--hosts", type=int, default=d.hosts)
    parser.add_argument("--max-replicas", type=int, default=d.max_replicas)
    parser.add_argument("--cores", type=int, default=d.cores, help="cores per host")
    parser.add_argument("--utilisation", type=float, default=d.utilisation)
    parser.add_argument("--idle-timeout-ms", type=float, default=d.idle_timeout_ms)
    parser.add_argument("--zipf-s", type=float, default=d.zipf_s)
    args = parser.parse_args(argv)
    cfg = Config(models=args.models, zipf_s=args.zipf_s, hosts=args.hosts, max_replicas=args.max_replicas,
                 cores=args.cores, utilisation=args.utilisation, idle_timeout_ms=args.idle_timeout_ms,
                 cold_ms=args.cold_ms, lukewarm_ms=args.lukewarm_ms, warm_ms=args.warm_ms)
    t0 = time.monotonic()
    results = run_all(cfg, args.seed, args.requests)
    result = result_json(cfg, args.seed, args.requests, results)
    print(f"sim: seed {args.seed}, {args.requests} requests ({results['random'].requests} measured after warm-up), "
          f"{cfg.models} models (Zipf s={cfg.zipf_s}), {cfg.hosts} hosts x {cfg.max_replicas} replicas / "
          f"{cfg.cores} cores, idle timeout {cfg.idle_timeout_ms:.0f} ms, starts cold {cfg.cold_ms} / "
          f"lukewarm {cfg.lukewarm_ms} / warm {cfg.warm_ms} ms; {time.monotonic() - t0:.1f} s")
    rows = table(results)
    rows.append(["lukewarm / least_loaded", result["ratio_vs_least_loaded"]] + [""] * 11)
    rows.append(["lukewarm / random", result["ratio_vs_random"]] + [""] * 11)
    rows.append([f"lukewarm / best ({result['best_baseline']})", result["ratio_vs_best_baseline"]] + [""] * 11)
    report(rows, result)


if __name__ == "__main__":
    main()
