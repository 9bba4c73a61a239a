"""Trace-driven simulation: the real proxy chooser against strong routing baselines, on several trace shapes.

Pure Python, no Redis, Docker or network. Each trace is replayed through a
discrete-event model of a fleet once per routing policy.

Trace shapes (``--trace``, all three by default), all over Zipf-popular models
with lognormal inference times:

- ``zipf``: Poisson arrivals at a constant rate;
- ``bursty``: each model's arrivals Markov-modulated on/off (exponential on and
  off periods, Poisson within them): a tail model comes in bursts with silences
  between; a popular one is only modulated (a burst adds at most
  ``burst_cap_cores`` of load, or the fleet would be overloaded in every burst
  of the top model);
- ``diurnal``: Poisson arrivals whose rate follows a sinusoid; the trace is one
  compressed day, trough (``1 / diurnal_ratio`` of the peak) at its start and end.

Routing policies (the ingress side):

- ``lukewarm``: what ``ingress.dispatch.Dispatcher`` does for a request:
  ``ingress.router.choose_proxies`` over the heartbeats the proxies would send
  (fresh; a replica's ``in_flight`` is the slots it has taken, requests waiting
  for a slot are in ``waiting``), with the start costs and inference time the
  ingress learns as it goes (``ingress.costs.CostBook``), then
  ``ingress.spread.spread`` (``--no-spread``: ``choose_proxies`` alone);
- ``least_loaded``: the host with the fewest requests (running or waiting);
- ``random``: a host picked uniformly;
- ``consistent_hash``: consistent hashing with bounded loads (Mirrokni, Thorup,
  Zadimoghaddam 2018): the model's first host on a hash ring whose load is within
  1.25x the mean, else the next;
- ``multiplex``: model-locality routing as in Ray Serve's model multiplexing: among
  the hosts holding the model in memory and below twice the mean load, the less
  loaded of two picked at random; with none, the same over all hosts.

The baselines see each host's true load; ``lukewarm`` sees only what a heartbeat says. What the baselines
read of the whole fleet (its total load, the hosts by load, the hosts holding each model) is kept in running
books (``Books``) at every write, not scanned per request: no Python pass over the hosts per request.

The proxy side is the same for every policy and follows
``runtime_proxy.replicas.ReplicaManager`` with the real decisions of
``runtime_proxy.policy``:

- a request waits at its host for a slot on a replica of its model (one request
  per replica, the proxy's default concurrency): a running replica with room,
  else a paused one thawed (the request takes it at once and waits for the
  thaw), else a stopped one booted (one at a time, no room made first: the proxy
  does not), else a new replica created cold when ``runtime_proxy.replica.start_pays``
  says so (the same function the proxy calls): at once when the version has no
  replica here, never while its only replicas are still starting, and otherwise
  once the requests beyond the starting ones would wait longer than a start
  (measured here: the pool's moving averages of a slot's hold time and of a cold
  start, the request longest in flight counting as at least that long; a timed
  re-check when that could change with nothing else happening). Room is made
  first: ``replicas_to_evict(..., evict_running=True)`` over views where a replica whose version has waiters counts as busy (``_make_room``),
  and when the host is still full the start fails and that version's waiters get
  503 unless another start of it is under way. New replicas of a version already
  here need the ingress's ``may_start`` (fewer than ``capacity.max`` running or
  starting across the fleet) and stay within ``capacity.max`` here;
- the reaper (``reap_once``): ``replicas_to_pause`` (running, idle for the idle
  timeout), ``replicas_to_stop`` (paused ``pause_stop_after_s`` longer),
  ``replicas_to_remove`` (stopped ``stop_remove_after_s`` longer) and
  ``replicas_to_evict`` without ``evict_running`` (stopped, then paused, oldest
  first, while the host is over its memory budget or ``max_replicas``; a stopped
  boot can put it over). So an idle running replica is evicted only in
  ``_make_room``, for a cold start: the proxy's one call with ``evict_running=True``;
- a host holds at most ``max_replicas`` replicas of any state (stopped ones too)
  and live ones (starting, running, paused) within ``memory_budget_mb``; a
  running request also needs one of the host's cores.

Starts, in three tiers: *thaw* (paused -> running, ``thaw_ms``), *stopped*
(docker start + model load, ``stopped_ms``) and *cold* (create + start + load,
``cold_ms``; images are on every host). A request counts as a **start** when it
waited for a stopped or cold start and was the first request of that replica:
``start_fraction = (stopped + cold) / requests``, the same count for every policy.
A thaw is a lukewarm start, reported apart (``thaw_fraction``). A start no request
waited for (a replica added because one queued, which then got a freed slot
first) is in the counters, not in the fractions. A start refused for want of an
idle replica to make room with waits up to 2 s for one, as the proxy's does, and
only then are its waiters refused. A refused request's client comes
back after the Retry-After (2 s) and is routed afresh, the wait in its latency;
after ``MAX_ATTEMPTS`` refusals it gives up (``failed``, left out of the latencies).

Time is in milliseconds. The proxy's lifecycle timers (the version's idle timeout,
``pause_stop_after_s``, ``stop_remove_after_s``, the reaper's interval; defaults
from ``shared.settings.ProxySettings`` and ``shared.messages.VersionSpec``) are
compressed: one of their seconds is ``ms_per_s`` simulated ms (default 1:
300 s idle -> 300 ms, stop 3.6 s later, remove 86.4 s after that), so that
tens of thousands of requests span many idle timeouts and the paused and
stopped tiers both occur; start and inference times are not compressed. The
reaper runs when a timer could fire rather than every interval. Metrics skip
the first ``warmup`` fraction of each trace (the fleet filling up from empty),
or with ``--warmup-ms`` the requests of its first simulated ms: at the same
load per host a 1000-host fleet gets 125x the requests per simulated second,
so a fraction of the trace would leave most of its fill-up in the figures.
``util`` is the share of the fleet's cores busy while the measured requests
arrived (the trace's offered load once the fleet keeps up).

Headline figures (the JSON's top level): ``start_fraction`` pooled over all
traces (total starts / total measured requests) and ``p99_ms`` over every measured
request of every trace pooled; per trace under ``traces``. Each trace names its
best baseline (fewest starts) and the ratios against it:
``start_ratio_vs_best_baseline`` (target <= 0.5) and
``p99_ratio_vs_best_baseline_start`` (Lukewarm's p99 / that baseline's; target <= 1);
at the top level those two are the worst trace's.

Not modelled: image pulls, heartbeat age (the ingress sees every change at
once), hedging, the capacity loop (``ingress.reconciler``), engine call times
for pause and stop, batch work, GPUs. The customer quota is applied but never
binds (each model is its own customer's).

    python -m loadtests.sim [--trace zipf,bursty,diurnal] [--requests N] [--quick] [--seed N] ...
"""
from __future__ import annotations

import argparse
import array
import bisect
import collections
import dataclasses
import hashlib
import heapq
import itertools
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from ingress.costs import CostBook
from ingress.index import FleetIndex
from ingress.router import ProxyState, ReplicaState, StartCosts, choose_proxies
from ingress.view import SAMPLE_D
from ingress.spread import spread
from runtime_proxy import policy
from runtime_proxy.policy import ReplicaView
from runtime_proxy.replica import DEFAULT_START_MS, MEASURE_ALPHA, queue_since, start_due_in_ms, start_pays
from runtime_proxy.replicas import ROOM_WAIT_S
from shared.messages import Capacity, VersionSpec
from shared.settings import ProxySettings

POLICIES = ("lukewarm", "least_loaded", "random", "consistent_hash", "multiplex")
BASELINES = POLICIES[1:]
TRACES = ("zipf", "bursty", "diurnal")
# Bounded loads: a host takes a model's request while its load is at most this x the mean (+1).
HASH_LOAD_FACTOR = 1.25
HASH_VNODES = 64
# What a request met. STOPPED and COLD are the starts; THAW is the lukewarm start.
WARM, THAW, STOPPED, COLD = "warm", "thaw", "stopped", "cold"
STARTS = (STOPPED, COLD)
# Replica states; RESUMING is a thaw under way (it holds its request, the heartbeat says "paused").
STARTING, RUNNING, RESUMING, PAUSED, STOPPED_STATE = "starting", "running", "resuming", "paused", "stopped"
LIVE = frozenset({STARTING, RUNNING, RESUMING, PAUSED})  # holds memory on the host
# Start kinds as the proxy reports them to the ingress (its CostBook learns from these).
# The tier the ingress's CostBook files an answer under (ingress.costs.start_tier: the proxy reports a thaw and
# a stopped replica's boot both as lukewarm, and only the thaw carries an unpause phase).
REPORTED_KIND = {WARM: "warm", THAW: "lukewarm", STOPPED: "stopped", COLD: "cold"}
# A refused request's client comes back after the proxy's Retry-After (2 s, not compressed: a client's
# wait), routed afresh; after this many refusals it gives up (counted, left out of the latencies).
RETRY_AFTER_MS = 2000.0
# A start refused for want of an idle replica to make room with waits this long for one (the proxy's
# ROOM_WAIT_S), before its waiters are refused; not compressed either: it is the caller's wait.
ROOM_WAIT_MS = ROOM_WAIT_S * 1000.0
MAX_ATTEMPTS = 5
TARGET_START_RATIO = 0.5
TARGET_P99_RATIO = 1.0



def _default(cls: type, name: str) -> Any:
    """A settings or spec dataclass's default for ``name``: the simulator follows the real defaults."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


# ---- configuration -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    # 50 models on 8 hosts of 16 replica slots: the catalog fits the fleet about 2.5 times over, so a
    # router that keeps each model on few hosts can hold all of them and one that spreads them cannot.
    # (With 100, every policy thrashes under the proxy's rules: the comparison says nothing.)
    models: int = 50
    zipf_s: float = 1.1
    hosts: int = 8
    cores: int = 4  # per host: requests running at once on a host
    max_replicas: int = _default(ProxySettings, "max_replicas")  # per host, every state counted (the proxy's rule)
    # Live replicas' memory per host: a host of 16 GB at the proxy's default share (75 %); the
    # replica count binds first for models of the median size, memory for the big ones.
    memory_budget_mb: int = 12288
    memory_mb: int = _default(VersionSpec, "memory_mb")  # median of the models' memory limits (lognormal)
    memory_sigma: float = 0.5
    capacity_max: int = _default(Capacity, "max")  # replicas of one version running across the fleet / on one host
    utilisation: float = 0.6  # offered load / (hosts * cores) of zipf and bursty; sets the arrival rate
    infer_ms: float = 20.0  # median of the models' mean inference times
    model_sigma: float = 0.25  # spread of the per-model means (lognormal)
    request_sigma: float = 0.3  # spread of one model's request times around its mean (lognormal)
    # Lifecycle timers in the proxy's seconds, and how many simulated ms one of them lasts.
    idle_timeout_s: float = _default(VersionSpec, "idle_timeout_s")
    pause_stop_after_s: float = _default(ProxySettings, "pause_stop_after_s")
    stop_remove_after_s: float = _default(ProxySettings, "stop_remove_after_s")
    reaper_interval_s: float = _default(ProxySettings, "reaper_interval_s")
    # 1: the idle timeout (300 s) lasts 300 ms, about one cold start, and the tail models' gaps are
    # around it; a paused replica stops after 3.9 s idle, a stopped one is removed after 90 s.
    ms_per_s: float = 1.0
    # Start tiers (PERFORMANCE.md): unpause -> first answer; start -> first answer (create + start
    # -> first answer less the create); create + start -> first answer. load_ms: a model's own load.
    thaw_ms: float = 20.0
    stopped_ms: float = 320.0
    cold_ms: float = 340.0
    load_ms: float = 0.0
    warm_ms: float = 0.2  # PERFORMANCE.md: warm request over the container's socket
    # bursty: mean on and off periods, and the most load one model's burst may add (cores).
    burst_on_ms: float = 2000.0
    burst_off_ms: float = 6000.0
    burst_cap_cores: float = 2.0
    # diurnal: peak utilisation and peak / trough rate.
    diurnal_peak_utilisation: float = 0.8
    diurnal_ratio: float = 4.0
    spread: bool = True  # the lukewarm ingress applies ingress.spread after choose_proxies
    warmup: float = 0.1  # fraction of each trace left out of the metrics
    # When set, the requests arriving in the first ``warmup_ms`` simulated ms are left out instead. A big
    # fleet fills up from empty for as long as a small one (a cold start and its queue, whatever the
    # size), but at the same load per host it takes 125x the requests per simulated second at 1000 hosts
    # than at 8: a fraction of the trace would leave most of the fill in the figures.
    warmup_ms: float | None = None

    @property
    def idle_ms(self) -> float:
        return self.idle_timeout_s * self.ms_per_s

    @property
    def stop_ms(self) -> float:
        return self.pause_stop_after_s * self.ms_per_s

    @property
    def remove_ms(self) -> float:
        return self.stop_remove_after_s * self.ms_per_s

    @property
    def reaper_ms(self) -> float:
        return self.reaper_interval_s * self.ms_per_s


@dataclasses.dataclass(frozen=True)
class Model:
    name: str  # its version key: each model is its own customer's
    share: float  # probability that a request is for this model
    mean_ms: float  # mean inference time
    memory_mb: int = 512


@dataclasses.dataclass(frozen=True)
class Arrival:
    index: int
    at_ms: float
    model: int
    infer_ms: float


def make_models(cfg: Config, rng: random.Random) -> list[Model]:
    weights = [1.0 / (k ** cfg.zipf_s) for k in range(1, cfg.models + 1)]
    total = sum(weights)
    return [Model(name=f"c{k:03d}/m{k:03d}/main/1", share=w / total,
                  mean_ms=cfg.infer_ms * rng.lognormvariate(0.0, cfg.model_sigma), memory_mb=_memory_mb(cfg, rng))
            for k, w in enumerate(weights)]


def _memory_mb(cfg: Config, rng: random.Random) -> int:
    """A model's memory limit: lognormal around the median, kept within 4x of it either way."""
    drawn = cfg.memory_mb * rng.lognormvariate(0.0, cfg.memory_sigma)
    return int(min(4 * cfg.memory_mb, max(cfg.memory_mb / 4, drawn)))


# ---- traces ------------------------------------------------------------------


def rate_per_ms(cfg: Config, models: Sequence[Model], utilisation: float) -> float:
    """Arrivals per ms that keep ``utilisation`` of the fleet's cores busy."""
    mean_ms = sum(m.share * m.mean_ms for m in models)
    return utilisation * cfg.hosts * cfg.cores / mean_ms


def arrival_rate_per_ms(cfg: Config, models: Sequence[Model]) -> float:
    return rate_per_ms(cfg, models, cfg.utilisation)


def _picker(models: Sequence[Model], rng: random.Random) -> Callable[[], int]:
    cumulative = list(itertools.accumulate(m.share for m in models))
    top = cumulative[-1]
    return lambda: min(len(models) - 1, bisect.bisect_left(cumulative, rng.random() * top))


def zipf_times(cfg: Config, models: Sequence[Model], n: int, rng: random.Random) -> list[tuple[float, int]]:
    """Poisson arrivals at the rate of ``cfg.utilisation``."""
    rate, pick = arrival_rate_per_ms(cfg, models), _picker(models, rng)
    out: list[tuple[float, int]] = []
    t = 0.0
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append((t, pick()))
    return out


def diurnal_rate(t: float, day_ms: float, peak: float, ratio: float) -> float:
    """The rate at ``t``: the trough (peak / ratio) at 0 and ``day_ms``, the peak at half a day."""
    trough = peak / ratio
    return trough + (peak - trough) * (1.0 - math.cos(2.0 * math.pi * t / day_ms)) / 2.0


def diurnal_day_ms(cfg: Config, models: Sequence[Model], n: int) -> float:
    """The length of the compressed day: ``n`` requests at the day's mean rate."""
    peak = rate_per_ms(cfg, models, cfg.diurnal_peak_utilisation)
    return n / ((peak + peak / cfg.diurnal_ratio) / 2.0)


def diurnal_times(cfg: Config, models: Sequence[Model], n: int, rng: random.Random) -> list[tuple[float, int]]:
    """A non-homogeneous Poisson process by thinning: candidates at the peak rate, kept at rate(t) / peak."""
    peak = rate_per_ms(cfg, models, cfg.diurnal_peak_utilisation)
    day, pick = diurnal_day_ms(cfg, models, n), _picker(models, rng)
    out: list[tuple[float, int]] = []
    t = 0.0
    while len(out) < n:
        t += rng.expovariate(peak)
        if rng.random() * peak <= diurnal_rate(t, day, peak, cfg.diurnal_ratio):
            out.append((t, pick()))
    return out


def burst_rates(cfg: Config, rate: float, mean_ms: float) -> tuple[float, float]:
    """(on, off) rates of one model whose mean rate is ``rate``: all of it in bursts when that adds at most
    ``burst_cap_cores`` of load, else the burst capped there and the rest spread over the off periods."""
    on_share = cfg.burst_on_ms / (cfg.burst_on_ms + cfg.burst_off_ms)
    on = min(rate / on_share, rate + cfg.burst_cap_cores / mean_ms)
    return on, max(0.0, (rate - on_share * on) / (1.0 - on_share))


def mmpp_times(rng: random.Random, on: float, off: float, on_ms: float, off_ms: float,
               until: float) -> list[float]:
    """Arrivals of a two-state Markov-modulated Poisson process, started in its stationary state."""
    out: list[float] = []
    t, is_on = 0.0, rng.random() < on_ms / (on_ms + off_ms)
    while t < until:
        end = min(until, t + rng.expovariate(1.0 / (on_ms if is_on else off_ms)))
        rate = on if is_on else off
        while rate > 0:
            t += rng.expovariate(rate)
            if t >= end:
                break
            out.append(t)
        t, is_on = end, not is_on
    return out


def bursty_times(cfg: Config, models: Sequence[Model], n: int, rng: random.Random) -> list[tuple[float, int]]:
    """Each model its own on/off process; the first ``n`` arrivals of all of them merged."""
    rate = arrival_rate_per_ms(cfg, models)
    until = 1.2 * n / rate  # enough for n most times; cut at the n-th below
    while True:
        out: list[tuple[float, int]] = []
        for k, m in enumerate(models):
            on, off = burst_rates(cfg, m.share * rate, m.mean_ms)
            out += [(t, k) for t in mmpp_times(rng, on, off, cfg.burst_on_ms, cfg.burst_off_ms, until)]
        if len(out) >= n:
            return sorted(out)[:n]
        until *= 1.5  # long silences of the popular models: draw a longer stretch


SHAPES: dict[str, Callable[[Config, Sequence[Model], int, random.Random], list[tuple[float, int]]]] = {
    "zipf": zipf_times, "bursty": bursty_times, "diurnal": diurnal_times,
}


def make_trace(cfg: Config, models: Sequence[Model], n: int, rng: random.Random,
               shape: str = "zipf") -> list[Arrival]:
    """``n`` arrivals of ``shape``; each request's time is lognormal with its model's mean."""
    times = SHAPES[shape](cfg, models, n, rng)
    mu_shift = -cfg.request_sigma ** 2 / 2  # so that E[time] == the model's mean
    return [Arrival(index=i, at_ms=t, model=m,
                    infer_ms=models[m].mean_ms * rng.lognormvariate(mu_shift, cfg.request_sigma))
            for i, (t, m) in enumerate(times)]


# ---- fleet entities ----------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Request:
    arrival: Arrival
    may_start: bool = True  # the ingress's word: another replica of the version may start
    host: int = -1
    tier: str = ""
    refusals: int = 0  # 503s it got (the client came back after Retry-After)
    failed: bool = False  # refused MAX_ATTEMPTS times: the client gave up
    predict_ms: float = math.nan  # when it was handed to the model (waits for a core from there)
    took_ms: float = math.nan  # when it took its slot (the proxy times a chunk's hold of it from there)
    core_ms: float = math.nan  # when it began running on one of its host's cores
    done_ms: float = math.nan

    @property
    def latency_ms(self) -> float:
        return self.done_ms - self.arrival.at_ms


@dataclasses.dataclass(eq=False)
class Replica:
    uid: str
    model: int
    memory_mb: int
    state: str  # starting | running | resuming | paused | stopped
    last_used: float
    in_flight: int = 0  # slots taken: 0 or 1
    start_kind: str = ""  # THAW, STOPPED or COLD until the first request after the start takes it
    start_ms: float = 0.0  # how long that start took
    ready_ms: float = 0.0  # when the start ends (ends, for a running one)
    taken_ms: float = 0.0  # when the request holding its slot took it (while in_flight)
    holding: Request | None = None  # the request waiting on this replica's thaw

    @property
    def reported(self) -> str:
        """The state in a heartbeat and in the policy's views (lifecycle.State.reported)."""
        return PAUSED if self.state == RESUMING else self.state


@dataclasses.dataclass(eq=False)
class Pool:
    """The replicas of one version on one host, and the requests waiting for a slot on one (FIFO)."""

    replicas: list[Replica] = dataclasses.field(default_factory=list)
    waiters: collections.deque[Request] = dataclasses.field(default_factory=collections.deque)
    # VersionPool's measurements: how long a request holds a slot, and a cold start (moving averages).
    infer_ms: float | None = None
    start_ms: float | None = None
    recheck_ms: float | None = None  # a scheduled re-examination of the waiters (start_due_in_ms)
    queued_since: float | None = None  # VersionPool.queued_since: waiters without a break since (ms)

    @property
    def coming(self) -> int:
        return sum(1 for r in self.replicas if r.state == STARTING)

    @property
    def serving(self) -> int:
        return sum(1 for r in self.replicas if r.state in (RUNNING, RESUMING))

    def wants_start(self, now: float) -> tuple[bool, float | None]:
        """``VersionPool.wants_start`` in ms: (start another now?, else in how many ms that may change)."""
        infer_ms = self.infer_ms or 0.0
        start_ms = self.start_ms if self.start_ms is not None else DEFAULT_START_MS
        taken = [r.taken_ms for r in self.replicas if r.in_flight]
        oldest_ms = now - min(taken) if taken else 0.0
        waiting, coming, serving = len(self.waiters), self.coming, self.serving
        self.queued_since = queue_since(self.queued_since, now, waiting, coming, serving)
        queued_ms = 0.0 if self.queued_since is None else now - self.queued_since
        if start_pays(waiting, coming, serving, max(infer_ms, oldest_ms), start_ms, queued_ms=queued_ms):
            self.queued_since = now
            return True, None
        return False, start_due_in_ms(waiting, coming, serving, infer_ms, start_ms, oldest_ms,
                                      queued_ms=queued_ms) if taken else None

    @property
    def load(self) -> int:
        return len(self.waiters) + sum(r.in_flight for r in self.replicas)


@dataclasses.dataclass(eq=False)
class Host:
    index: int
    replicas: dict[str, Replica] = dataclasses.field(default_factory=dict)  # uid -> replica, oldest first
    pools: dict[int, Pool] = dataclasses.field(default_factory=dict)  # model -> its pool
    running: int = 0  # requests on a core
    run_queue: collections.deque[tuple[Replica, Request]] = dataclasses.field(default_factory=collections.deque)
    load: int = 0  # requests here: holding a slot or waiting for one
    snapshot: ProxyState | None = None  # cached heartbeat, dropped on any change
    room_waits: dict[int, float] = dataclasses.field(default_factory=dict)  # model -> end of its wait for room

    def pool(self, model: int) -> Pool:
        found = self.pools.get(model)
        if found is None:
            found = self.pools[model] = Pool()
        return found


@dataclasses.dataclass
class Counters:
    cold_starts: int = 0
    cold_dup: int = 0  # while another host was already starting the same model
    stopped_boots: int = 0
    thaws: int = 0
    paused: int = 0
    stopped: int = 0
    removed: int = 0
    evicted: int = 0
    evicted_running: int = 0
    refused: int = 0  # 503s (a request refused twice counts twice)


@dataclasses.dataclass(frozen=True)
class Eviction:
    """One eviction as the simulator did it: why, and the victim as it was."""

    reason: str  # "room" (a cold start's _make_room, evict_running) or "reaper" (reap_once, never running)
    state: str
    in_flight: int
    waiting: int


Handler = Callable[["Fleet", Any, float], None]


@dataclasses.dataclass
class Books:
    """What the baselines read of the whole fleet, kept at every write rather than scanned per request (a scan is
    O(hosts) Python work a request: too slow at 1000 hosts). Writes go through ``add_load`` (a host's load),
    ``add_replica``, ``set_state`` and ``retire`` (a replica's state); ``scan_books`` recomputes the same from
    the hosts, which the tests compare against."""

    total_load: int = 0  # the sum of the hosts' loads
    by_load: dict[int, set[int]] = dataclasses.field(default_factory=dict)  # load -> hosts with it (none empty)
    min_load: int = 0  # the least load of any host (0 with no hosts)
    live: dict[int, dict[int, int]] = dataclasses.field(default_factory=dict)  # model -> {host: live replicas}
    starting: dict[int, dict[int, int]] = dataclasses.field(default_factory=dict)  # model -> {host: starting}


def scan_books(hosts: Sequence[Host]) -> Books:
    """The books by brute force, from every host and replica (how they start, and their check)."""
    books = Books()
    for h in hosts:
        books.total_load += h.load
        books.by_load.setdefault(h.load, set()).add(h.index)
        for r in h.replicas.values():
            _tally(books, h.index, r.model, r.state, 1)
    books.min_load = min(books.by_load, default=0)
    return books


def _bump(table: dict[int, dict[int, int]], model: int, host: int, delta: int) -> None:
    per = table.setdefault(model, {})
    count = per.get(host, 0) + delta
    if count:
        per[host] = count
    else:
        del per[host]
        if not per:
            del table[model]


def _tally(books: Books, host: int, model: int, state: str, delta: int) -> None:
    """Count a replica of ``model`` on ``host`` in ``state`` in (``delta`` 1) or out (-1) of the books."""
    if state in LIVE:
        _bump(books.live, model, host, delta)
        if state == STARTING:
            _bump(books.starting, model, host, delta)


def add_load(fleet: Fleet, host: Host, delta: int) -> None:
    """The one write of a host's load (requests holding a slot or waiting for one)."""
    books, old = fleet.books, host.load
    new = host.load = old + delta
    books.total_load += delta
    bucket = books.by_load[old]
    bucket.discard(host.index)
    if not bucket:
        del books.by_load[old]
    books.by_load.setdefault(new, set()).add(host.index)
    if new < books.min_load:
        books.min_load = new
    elif old == books.min_load and old not in books.by_load:
        books.min_load = min(books.by_load)


def set_state(fleet: Fleet, host: Host, replica: Replica, state: str) -> None:
    """The one write of a replica's state once it is on its host (one retired is out of the books already)."""
    if replica.state != state and host.replicas.get(replica.uid) is replica:
        _tally(fleet.books, host.index, replica.model, replica.state, -1)
        _tally(fleet.books, host.index, replica.model, state, 1)
    replica.state = state


def add_replica(fleet: Fleet, host: Host, replica: Replica) -> None:
    """Put a new replica on its host (and in its pool)."""
    host.replicas[replica.uid] = replica
    host.pool(replica.model).replicas.append(replica)
    _tally(fleet.books, host.index, replica.model, replica.state, 1)


@dataclasses.dataclass(eq=False)
class Fleet:
    cfg: Config
    models: list[Model]
    hosts: list[Host]
    costs: CostBook
    events: list[tuple[float, int, Handler, Any]] = dataclasses.field(default_factory=list)
    seq: int = 0
    next_uid: int = 0
    answered: int = 0  # requests completed or given up
    route: Policy | None = None
    rng: random.Random = dataclasses.field(default_factory=random.Random)
    counters: Counters = dataclasses.field(default_factory=Counters)
    evictions: list[Eviction] = dataclasses.field(default_factory=list)
    # What the lukewarm ingress's view holds (ingress.index.FleetIndex): every host's heartbeat, indexed by the
    # versions it holds; hosts changed since it was last brought up to date (their next heartbeat).
    index: FleetIndex = dataclasses.field(default_factory=FleetIndex)
    dirty: set[int] = dataclasses.field(default_factory=set)
    books: Books = dataclasses.field(default_factory=Books)  # the baselines' view of the whole fleet

    def __post_init__(self) -> None:
        self.books = scan_books(self.hosts)

    def schedule(self, at_ms: float, handler: Handler, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at_ms, self.seq, handler, payload))


def new_fleet(cfg: Config, models: list[Model]) -> Fleet:
    defaults = StartCosts(lukewarm_ms=cfg.thaw_ms, cold_ms=cfg.cold_ms + cfg.load_ms, infer_ms=cfg.infer_ms,
                          stopped_ms=cfg.stopped_ms + cfg.load_ms)
    fleet = Fleet(cfg=cfg, models=models, hosts=[Host(index=i) for i in range(cfg.hosts)], costs=CostBook(defaults))
    fleet.dirty.update(range(cfg.hosts))  # every host's first heartbeat
    return fleet


# ---- what an ingress sees ----------------------------------------------------


def changed(fleet: Fleet, host: Host) -> None:
    """The host's state moved: its heartbeat is built again when next needed."""
    host.snapshot = None
    fleet.dirty.add(host.index)


def sync_view(fleet: Fleet) -> None:
    """Bring the ingress's view up to date with the hosts that changed (as their heartbeats would)."""
    for i in fleet.dirty:
        fleet.index[str(i)] = proxy_state(fleet, fleet.hosts[i])
    fleet.dirty.clear()


def proxy_state(fleet: Fleet, host: Host) -> ProxyState:
    """The host as its heartbeat would describe it (``ReplicaManager.snapshot`` and ``waiting``)."""
    if host.snapshot is None:
        names = fleet.models
        host.snapshot = ProxyState(
            proxy_id=str(host.index), url=f"http://host{host.index}:8081", epoch=1, ts=0.0,
            replicas=tuple(ReplicaState(names[r.model].name, r.reported, r.in_flight, 1, r.memory_mb)
                           for r in host.replicas.values()),
            max_replicas=fleet.cfg.max_replicas, memory_budget_mb=fleet.cfg.memory_budget_mb,
            waiting=tuple((names[m].name, len(p.waiters)) for m, p in host.pools.items() if p.waiters),
        )
    return host.snapshot


def may_start(fleet: Fleet, model: int) -> bool:
    """``Dispatcher._may_start``: fewer than capacity.max replicas running or starting across the fleet
    (``StateView.running_of``, from the holders)."""
    sync_view(fleet)
    return fleet.index.running_of(fleet.models[model].name) < fleet.cfg.capacity_max


# ---- routing policies: (fleet, request, now, rng) -> host index --------------

Policy = Callable[[Fleet, Request, float, random.Random], int]


def route_lukewarm(fleet: Fleet, req: Request, now: float, rng: random.Random) -> int:
    name = fleet.models[req.arrival.model].name
    sync_view(fleet)
    # What the Dispatcher ranks: the version's holders and SAMPLE_D sampled hosts with room (the fleet index).
    # Heartbeats are taken as fresh (ts 0, any age accepted): the simulator models no staleness. Cold hosts
    # are always sampled (the dispatcher skips them when a warm slot is free and none of its requests of the
    # version is in flight: the same first choice, the sampling's cost saved).
    proxies = fleet.index.candidates(name, rng, SAMPLE_D, now, math.inf, frozenset())
    choices = choose_proxies(proxies, name, now, rng, fleet.costs.costs(name), max_age_s=math.inf)
    if fleet.cfg.spread:
        # What this ingress has sent to each candidate (``spread`` reads no other host's).
        hosts = [fleet.hosts[int(c.proxy.proxy_id)] for c in choices]
        sent = {str(h.index): h.pools[req.arrival.model].load for h in hosts if req.arrival.model in h.pools}
        choices = spread(choices, name, sent, req.may_start, fleet.costs.costs(name).infer_ms)
    return int(choices[0].proxy.proxy_id)


# A 32-bit word of the Mersenne Twister, as getrandbits lays them out.
_WORD = next(t for t in "IL" if array.array(t).itemsize == 4)


def route_least_loaded(fleet: Fleet, req: Request, now: float, rng: random.Random) -> int:
    """``min(fleet.hosts, key=lambda h: (h.load, rng.random()))``: the least-loaded host, ties broken by one
    ``random()`` drawn per host in index order. Drawn here at once, as the same generator words: ``random()``
    is two 32-bit words ``a``, ``b`` -> ``((a >> 5) * 2**26 + (b >> 6)) / 2**53``, and ``getrandbits(64 * n)``
    is the next ``2n`` words, the first the least significant. Only the least-loaded hosts' draws are compared
    (``books.by_load``): the same host and the same generator state after, without a Python pass over the hosts."""
    n = len(fleet.hosts)
    if type(rng) is not random.Random:  # another generator: draw as written
        return min(fleet.hosts, key=lambda h: (h.load, rng.random())).index
    words = array.array(_WORD, rng.getrandbits(64 * n).to_bytes(8 * n, "little"))
    if sys.byteorder == "big":
        words.byteswap()
    return least_draw(fleet.books.by_load[fleet.books.min_load], words)


def least_draw(least: set[int], words: array.array[int]) -> int:
    """Of the hosts ``least``, the one whose ``random()`` (words ``2j``, ``2j + 1``) is least, ties by index."""
    if len(least) == 1:
        return next(iter(least))
    # The least first word (a C-speed pass); unless the runner-up's has the same top 27 bits (about 2**-27 a
    # pair), its host has the least random() outright. Else compare the whole draws, ties by index.
    first = words[::2]
    best = min(least, key=first.__getitem__)
    top, first[best] = first[best], 0xFFFFFFFF
    runner_up = min(least, key=first.__getitem__)
    if first[runner_up] >> 5 != top >> 5:
        return best
    return min(least, key=lambda j: (words[2 * j] >> 5, words[2 * j + 1] >> 6, j))


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
    total = fleet.books.total_load + 1
    cap = math.ceil(HASH_LOAD_FACTOR * total / len(fleet.hosts))
    start = bisect.bisect_left(ring, (key, -1)) % len(ring)
    seen: set[int] = set()
    for i in range(len(ring)):
        host = ring[(start + i) % len(ring)][1]
        if host in seen:
            continue
        seen.add(host)
        if fleet.hosts[host].load < cap:
            return host
    return ring[start][1]


def _two_choices(hosts: Sequence[Host], rng: random.Random) -> int:
    if len(hosts) == 1:
        return hosts[0].index
    a, b = rng.sample(list(hosts), 2)
    return (a if a.load <= b.load else b).index


def holds(host: Host, model: int) -> bool:
    """Whether the host has the model in memory (a live replica): what Ray's multiplexing tracks."""
    pool = host.pools.get(model)
    return pool is not None and any(r.state in LIVE for r in pool.replicas)


def route_multiplex(fleet: Fleet, req: Request, now: float, rng: random.Random) -> int:
    # Like Ray Serve: a replica that has the model loaded, unless those are all saturated (twice the
    # mean load), then any replica by two choices (it loads the model, evicting as the proxy does).
    # The hosts that hold the model (``holds``), from the books, in index order as a scan would list them.
    limit = 2 * max(1.0, fleet.books.total_load / len(fleet.hosts))
    hosts = fleet.hosts
    holding = [hosts[i] for i in sorted(fleet.books.live.get(req.arrival.model, ())) if hosts[i].load < limit]
    return _two_choices(holding or fleet.hosts, rng)


ROUTERS: dict[str, Policy] = {"lukewarm": route_lukewarm, "least_loaded": route_least_loaded, "random": route_random,
                              "consistent_hash": route_consistent_hash, "multiplex": route_multiplex}

# ---- the proxy side: views and the policy's decisions ------------------------


def view(fleet: Fleet, r: Replica, in_flight: int | None = None) -> ReplicaView:
    """``Replica.view()`` (``in_flight``: as the view's, if given). The policy only compares differences of
    times, so ms work as its unit."""
    return ReplicaView(replica_id=r.uid, version_key=fleet.models[r.model].name, state=r.reported,
                       in_flight=r.in_flight if in_flight is None else in_flight, last_used=r.last_used,
                       idle_timeout_s=fleet.cfg.idle_ms, keep_warm=False, memory_mb=r.memory_mb)


def eviction_view(fleet: Fleet, host: Host, r: Replica) -> ReplicaView:
    """``ReplicaManager._eviction_views``: a replica whose version has waiters, or that is thawing, is busy."""
    busy = r.in_flight == 0 and bool(host.pools[r.model].waiters or r.state == RESUMING)
    return view(fleet, r, 1 if busy else None)


def retire(fleet: Fleet, host: Host, r: Replica, reason: str = "") -> None:
    """Forget a replica and its container (``_retire``)."""
    del host.replicas[r.uid]
    pool = host.pools[r.model]
    pool.replicas.remove(r)
    _tally(fleet.books, host.index, r.model, r.state, -1)
    changed(fleet, host)
    if reason:
        fleet.counters.evicted += 1
        fleet.counters.evicted_running += r.state == RUNNING
        fleet.evictions.append(Eviction(reason, r.state, r.in_flight, len(pool.waiters)))


def make_room(fleet: Fleet, host: Host, model: Model) -> bool:
    """``_make_room`` for one cold start: the customer's quota, then evict (idle running ones too); whether
    the replica fits. Decided before anything is evicted, as in the proxy. The only call of the policy
    with ``evict_running=True``, as there."""
    cfg = fleet.cfg
    views = [eviction_view(fleet, host, r) for r in host.replicas.values()]
    mine = policy.quota_evictions(views, model.name.split("/", 1)[0], max(1, cfg.max_replicas // 2))
    if mine is None:
        return False
    evict = policy.replicas_to_evict([v for v in views if v.replica_id not in mine], cfg.memory_budget_mb,
                                     cfg.max_replicas, incoming_mb=model.memory_mb, evict_running=True, incoming=1)
    gone = {*mine, *evict}
    live = [r for r in host.replicas.values() if r.state in LIVE and r.uid not in gone]
    if not policy.fits(len(live), sum(r.memory_mb for r in live), model.memory_mb, cfg.max_replicas,
                       cfg.memory_budget_mb):
        return False
    for rid in (*mine, *evict):
        retire(fleet, host, host.replicas[rid], "room")
    return True


# ---- the proxy side: acquiring a slot ------------------------------------------


def admit(fleet: Fleet, host: Host, req: Request, now: float) -> None:
    """A request reaches ``host``: it waits for a slot on a replica of its model there."""
    req.host = host.index
    add_load(fleet, host, 1)
    host.pool(req.arrival.model).waiters.append(req)
    changed(fleet, host)
    serve(fleet, host, req.arrival.model, now)


def serve(fleet: Fleet, host: Host, model: int, now: float) -> None:
    """Every waiter of the pool runs one round of ``ReplicaManager._acquire``'s loop, oldest first."""
    pool = host.pools[model]
    for req in list(pool.waiters):
        replica = pick(pool) or resume_one(fleet, host, pool, now)
        if replica is not None:
            pool.waiters.remove(req)
            take(fleet, host, replica, req, now)
            continue
        # Another replica with the ingress's leave, or as the first here; only once the queue would outlast
        # a start (runtime_proxy.replica.start_pays), else the waiters look again when that may change.
        if not (req.may_start or not pool.replicas):
            continue
        pays, due_ms = pool.wants_start(now)
        if pays:
            if not start_more(fleet, host, model, now):
                break
        elif due_ms is not None:
            recheck(fleet, host, model, now + due_ms + 1e-6)
    if not pool.waiters:
        pool.queued_since = None  # VersionPool.queue_gone


def recheck(fleet: Fleet, host: Host, model: int, at_ms: float) -> None:
    """The waiters' timed wake-up (``VersionPool.wait_change(timeout_s)``), one per pool at a time."""
    pool = host.pools[model]
    if pool.recheck_ms is None or at_ms < pool.recheck_ms:
        pool.recheck_ms = at_ms
        fleet.schedule(at_ms, on_recheck, (host, model, at_ms))


def on_recheck(fleet: Fleet, payload: tuple[Host, int, float], now: float) -> None:
    host, model, at_ms = payload
    pool = host.pools[model]
    if pool.recheck_ms != at_ms:
        return  # superseded by an earlier one
    pool.recheck_ms = None
    serve(fleet, host, model, now)


def pick(pool: Pool) -> Replica | None:
    """``VersionPool.pick``: a replica with room (running or thawing), most recently used first."""
    ready = [r for r in pool.replicas if r.state in (RUNNING, RESUMING) and r.in_flight == 0]
    return max(ready, key=lambda r: r.last_used) if ready else None


def resume_one(fleet: Fleet, host: Host, pool: Pool, now: float) -> Replica | None:
    """``_resume_one``: thaw the newest paused replica (returned: the request takes it and waits for the thaw),
    else boot the newest stopped one when none is starting (returns None: it is coming)."""
    paused = [r for r in pool.replicas if r.state == PAUSED]
    if paused:
        replica = max(paused, key=lambda r: r.last_used)
        begin_start(fleet, host, replica, RESUMING, THAW, fleet.cfg.thaw_ms, now)
        fleet.counters.thaws += 1
        return replica
    stopped = [r for r in pool.replicas if r.state == STOPPED_STATE]
    if stopped and not pool.coming:
        replica = max(stopped, key=lambda r: r.last_used)
        # No room is made for it (the proxy boots a stopped replica as it is): the reaper evicts later.
        begin_start(fleet, host, replica, STARTING, STOPPED, fleet.cfg.stopped_ms + fleet.cfg.load_ms, now)
        fleet.counters.stopped_boots += 1
        fleet.schedule(now + fleet.cfg.reaper_ms, on_reap, (host, None, 0.0))
    return None


def start_more(fleet: Fleet, host: Host, model: int, now: float) -> bool:
    """``_start_more``: a cold replica when the version has room here and the host can make room;
    False (and the version's waiters refused when nothing else is starting) when it cannot."""
    pool = host.pools[model]
    if len(pool.replicas) >= min(fleet.cfg.capacity_max, fleet.cfg.max_replicas):
        return True  # the version's cap here: its waiters wait for a slot
    m = fleet.models[model]
    if not make_room(fleet, host, m):
        if not pool.coming and model not in host.room_waits:
            # ``_acquire``: the waiters wait ROOM_WAIT_MS for room (``room_freed``), then are refused.
            until = host.room_waits[model] = now + ROOM_WAIT_MS
            fleet.schedule(until, on_room_wait_over, (host, model, until))
        return False
    host.room_waits.pop(model, None)
    fleet.next_uid += 1
    replica = Replica(uid=str(fleet.next_uid), model=model, memory_mb=m.memory_mb, state=STARTING, last_used=now)
    add_replica(fleet, host, replica)
    fleet.counters.cold_dup += any(h != host.index for h in fleet.books.starting.get(model, ()))
    fleet.counters.cold_starts += 1
    begin_start(fleet, host, replica, STARTING, COLD, fleet.cfg.cold_ms + fleet.cfg.load_ms, now)
    return True


def begin_start(fleet: Fleet, host: Host, replica: Replica, state: str, kind: str, cost_ms: float,
                now: float) -> None:
    set_state(fleet, host, replica, state)
    replica.start_kind, replica.start_ms, replica.ready_ms = kind, cost_ms, now + cost_ms
    changed(fleet, host)
    fleet.schedule(now + cost_ms, on_thawed if state == RESUMING else on_ready, (host, replica))


def on_room_wait_over(fleet: Fleet, payload: tuple[Host, int, float], now: float) -> None:
    """The waiters' wait for room ended: those still without a slot or a start coming get the 503."""
    host, model, until = payload
    if host.room_waits.get(model) != until:
        return  # a start got room meanwhile (or a later wait began)
    del host.room_waits[model]
    pool = host.pools[model]
    if pool.waiters and not pool.coming:
        refuse(fleet, host, pool, now)


def room_freed(fleet: Fleet, host: Host, now: float) -> None:
    """A call ended or the reaper ran: versions waiting here for room try their start again (the proxy's
    ``_room`` pulse)."""
    for model in list(host.room_waits):
        if model in host.room_waits:
            serve(fleet, host, model, now)


def refuse(fleet: Fleet, host: Host, pool: Pool, now: float) -> None:
    """The start failed for lack of room: its waiters get 503 (``pool.failure``); their clients come back later."""
    add_load(fleet, host, -len(pool.waiters))
    for req in pool.waiters:
        fleet.counters.refused += 1
        req.refusals += 1
        if req.refusals >= MAX_ATTEMPTS:
            req.failed, req.done_ms = True, now
            fleet.answered += 1
        else:
            fleet.schedule(now + RETRY_AFTER_MS, on_arrive, req)
    pool.waiters.clear()
    changed(fleet, host)


def take(fleet: Fleet, host: Host, replica: Replica, req: Request, now: float) -> None:
    """``_take``: the request holds the replica's slot; it met the replica's start if it waited for it."""
    replica.in_flight += 1
    replica.last_used = replica.taken_ms = req.took_ms = now
    req.tier = WARM
    if replica.start_kind:
        # The first request after a start reports it (Replica.take_start); it met it if it was waiting.
        if req.arrival.at_ms < replica.ready_ms:
            req.tier = replica.start_kind
        replica.start_kind = ""
    changed(fleet, host)
    if replica.state == RESUMING:
        replica.holding = req  # sent while the unpause is in flight: answered once it thaws
    else:
        to_core(fleet, host, replica, req, now)


def to_core(fleet: Fleet, host: Host, replica: Replica, req: Request, now: float) -> None:
    req.predict_ms = now
    host.run_queue.append((replica, req))
    run_next(fleet, host, now)


def run_next(fleet: Fleet, host: Host, now: float) -> None:
    while host.running < fleet.cfg.cores and host.run_queue:
        replica, req = host.run_queue.popleft()
        host.running += 1
        duration = req.arrival.infer_ms + (fleet.cfg.warm_ms if req.tier == WARM else 0.0)
        req.core_ms = now
        fleet.schedule(now + duration, on_done, (host, replica, req))


# ---- the proxy side: events -------------------------------------------------------


def on_ready(fleet: Fleet, payload: tuple[Host, Replica], now: float) -> None:
    """A cold or stopped start finished: the replica runs and its waiters may take it."""
    host, replica = payload
    if host.replicas.get(replica.uid) is not replica or replica.state != STARTING:
        return
    if replica.start_kind == COLD:
        _note_start(host.pools[replica.model], replica.start_ms)
    set_state(fleet, host, replica, RUNNING)
    replica.last_used = now
    changed(fleet, host)
    serve(fleet, host, replica.model, now)
    idle_timer(fleet, host, replica, now)
    if host.room_waits and not host.pools[replica.model].waiters:
        room_freed(fleet, host, now)  # its waiters left: its replicas are no longer held for them


def on_thawed(fleet: Fleet, payload: tuple[Host, Replica], now: float) -> None:
    host, replica = payload
    set_state(fleet, host, replica, RUNNING)
    changed(fleet, host)
    req, replica.holding = replica.holding, None
    if req is not None:
        to_core(fleet, host, replica, req, now)


def on_done(fleet: Fleet, payload: tuple[Host, Replica, Request], now: float) -> None:
    host, replica, req = payload
    req.done_ms = now
    fleet.answered += 1
    host.running -= 1
    add_load(fleet, host, -1)
    replica.in_flight -= 1
    replica.last_used = now
    changed(fleet, host)
    pool = host.pools[replica.model]
    pool.infer_ms = _ewma(pool.infer_ms, now - req.took_ms)
    learn(fleet, req, now)
    run_next(fleet, host, now)
    serve(fleet, host, replica.model, now)
    idle_timer(fleet, host, replica, now)
    if host.room_waits:
        room_freed(fleet, host, now)


def _ewma(old: float | None, sample: float) -> float:
    return sample if old is None else old + MEASURE_ALPHA * (sample - old)


def _note_start(pool: Pool, ms: float) -> None:
    pool.start_ms = _ewma(pool.start_ms, ms)


def learn(fleet: Fleet, req: Request, now: float) -> None:
    """What the ingress's CostBook records of the answer: the start the proxy reported, and the time in predict."""
    start_ms = {THAW: fleet.cfg.thaw_ms, STOPPED: fleet.cfg.stopped_ms + fleet.cfg.load_ms,
                COLD: fleet.cfg.cold_ms + fleet.cfg.load_ms}.get(req.tier, 0.0)
    fleet.costs.record(fleet.models[req.arrival.model].name, REPORTED_KIND[req.tier], start_ms,
                       now - req.predict_ms, 1)


def idle_timer(fleet: Fleet, host: Host, replica: Replica, now: float) -> None:
    """Run the reaper when this replica's idle timeout ends, unless it is used again before."""
    if replica.in_flight == 0:
        fleet.schedule(replica.last_used + fleet.cfg.idle_ms, on_reap, (host, replica, replica.last_used))


def on_reap(fleet: Fleet, payload: tuple[Host, Replica | None, float], now: float) -> None:
    """A timer fired: run the reaper on the host, unless the replica it was for moved on since."""
    host, replica, last_used = payload
    if replica is not None and (host.replicas.get(replica.uid) is not replica or replica.last_used != last_used):
        return
    reap(fleet, host, now)


def reap(fleet: Fleet, host: Host, now: float) -> None:
    """``ReplicaManager.reap_once``: pause, stop, remove, then evict (never a running replica)."""
    cfg = fleet.cfg
    views = [view(fleet, r) for r in host.replicas.values()]
    for rid in policy.replicas_to_pause(views, now):
        freeze(fleet, host, rid, RUNNING, PAUSED, now)
    for rid in policy.replicas_to_stop(views, now, cfg.stop_ms):
        freeze(fleet, host, rid, PAUSED, STOPPED_STATE, now)
    views = [view(fleet, r) for r in host.replicas.values()]
    for rid in policy.replicas_to_remove(views, now, cfg.stop_ms, cfg.remove_ms):
        if host.replicas[rid].state == STOPPED_STATE:
            retire(fleet, host, host.replicas[rid])
            fleet.counters.removed += 1
    views = [view(fleet, r) for r in host.replicas.values()]
    for rid in policy.replicas_to_evict(views, cfg.memory_budget_mb, cfg.max_replicas):
        retire(fleet, host, host.replicas[rid], "reaper")
    if host.room_waits:
        room_freed(fleet, host, now)


def freeze(fleet: Fleet, host: Host, rid: str, wanted: str, after: str, now: float) -> None:
    """``_freeze``: pause (or stop) an idle replica; then time the reaper's next look at it."""
    replica = host.replicas.get(rid)
    if replica is None or replica.in_flight or replica.state != wanted or host.pools[replica.model].waiters:
        return
    set_state(fleet, host, replica, after)
    changed(fleet, host)
    cfg = fleet.cfg
    if after == PAUSED:
        fleet.counters.paused += 1
        at = replica.last_used + cfg.idle_ms + cfg.stop_ms
    else:
        fleet.counters.stopped += 1
        at = replica.last_used + cfg.idle_ms + cfg.stop_ms + cfg.remove_ms
    fleet.schedule(max(now, at), on_reap, (host, replica, replica.last_used))


# ---- one run -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Result:
    policy: str
    total: int  # every request of the trace
    total_answered: int  # completed or given up
    requests: int  # measured (after warm-up)
    completed: int
    starts: int  # measured requests that waited for a stopped or cold start
    thaws: int
    cold: int
    stopped: int
    refused: int  # measured requests refused at least once (then retried)
    failed: int  # measured requests refused MAX_ATTEMPTS times
    start_fraction: float
    cold_fraction: float
    stopped_fraction: float
    thaw_fraction: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    counters: Counters
    utilisation: float
    latencies: tuple[float, ...] = dataclasses.field(default=(), repr=False)  # measured, sorted


def on_arrive(fleet: Fleet, req: Request, now: float) -> None:
    """A request (or its client's retry) reaches the ingress: routed, then admitted at that host."""
    assert fleet.route is not None
    req.may_start = may_start(fleet, req.arrival.model)
    admit(fleet, fleet.hosts[fleet.route(fleet, req, now, fleet.rng)], req, now)


def simulate(cfg: Config, models: list[Model], trace: Sequence[Arrival], policy_name: str, seed: int,
             fleet: Fleet | None = None) -> Result:
    """Replay ``trace`` through a fresh fleet (or ``fleet``, to look at it afterwards) routed by ``policy_name``."""
    fleet = fleet or new_fleet(cfg, models)
    fleet.route, fleet.rng = ROUTERS[policy_name], random.Random(f"{seed}:{policy_name}")
    requests = [Request(arrival=a) for a in trace]
    for req in requests:
        fleet.schedule(req.arrival.at_ms, on_arrive, req)
    # Until the last request is answered: the reaper's timers after it change no figure.
    while fleet.events and fleet.answered < len(requests):
        now, _, handler, payload = heapq.heappop(fleet.events)
        handler(fleet, payload, now)
    return summarise(cfg, policy_name, requests, fleet.counters)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def summarise(cfg: Config, policy_name: str, requests: Sequence[Request], counters: Counters) -> Result:
    if cfg.warmup_ms is None:
        measured = list(requests[int(len(requests) * cfg.warmup):])
    else:
        measured = [r for r in requests if r.arrival.at_ms >= cfg.warmup_ms]
    done = [r for r in measured if not r.failed and not math.isnan(r.done_ms)]
    n = max(1, len(measured))
    tiers = collections.Counter(r.tier for r in done)
    lat = tuple(sorted(r.latency_ms for r in done))
    starts = sum(tiers[t] for t in STARTS)
    return Result(
        policy=policy_name, total=len(requests), total_answered=sum(not math.isnan(r.done_ms) for r in requests),
        requests=len(measured), completed=len(done), starts=starts, thaws=tiers[THAW], cold=tiers[COLD],
        stopped=tiers[STOPPED], refused=sum(r.refusals > 0 for r in measured), failed=sum(r.failed for r in measured),
        start_fraction=starts / n, cold_fraction=tiers[COLD] / n, stopped_fraction=tiers[STOPPED] / n,
        thaw_fraction=tiers[THAW] / n, p50_ms=percentile(lat, 50), p99_ms=percentile(lat, 99),
        mean_ms=sum(lat) / max(1, len(lat)), counters=counters,
        utilisation=measured_utilisation(cfg, requests, measured), latencies=lat,
    )


def measured_utilisation(cfg: Config, requests: Sequence[Request], measured: Sequence[Request]) -> float:
    """The share of the fleet's cores busy while the measured requests arrived: the load the trace offers
    (``cfg.utilisation``) once the fleet keeps up with it. Busy time over the whole run, up to the last
    answer, read far lower on a short trace: the fill at the start and the tail of the last starts
    weighed on it."""
    if len(measured) < 2:
        return math.nan
    t0, t1 = measured[0].arrival.at_ms, measured[-1].arrival.at_ms
    busy = sum(min(r.done_ms, t1) - max(r.core_ms, t0) for r in requests
               if r.core_ms < t1 and r.done_ms > t0)  # NaN (never ran) compares False
    return busy / max(1e-9, (t1 - t0) * cfg.hosts * cfg.cores)


def run_all(cfg: Config, seed: int, n: int, shape: str = "zipf",
            policies: Sequence[str] = POLICIES) -> dict[str, Result]:
    """Every policy (of ``policies``) on the same trace of ``shape`` (same models, same arrivals)."""
    rng = random.Random(f"{seed}:{shape}")
    models = make_models(cfg, rng)
    trace = make_trace(cfg, models, n, rng, shape)
    return {p: simulate(cfg, models, trace, p, seed) for p in policies}


# ---- figures -----------------------------------------------------------------


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def best_baseline(start_fraction: dict[str, float]) -> str:
    """The strongest baseline: the one with the fewest starts."""
    return min((p for p in BASELINES if p in start_fraction), key=lambda p: start_fraction[p])


def figures(start_fraction: dict[str, float], p99_ms: dict[str, float]) -> dict[str, Any]:
    """The ratios against the best baseline, and whether they meet the target."""
    best = best_baseline(start_fraction)
    start_ratio = ratio(start_fraction["lukewarm"], start_fraction[best])
    p99_ratio = ratio(p99_ms["lukewarm"], p99_ms[best])
    if start_fraction[best] == 0:  # nothing to halve: the target holds only with no starts either
        start_ratio = 0.0 if start_fraction["lukewarm"] == 0 else math.inf
    return {"best_baseline": best, "ratio": start_ratio, "start_ratio_vs_best_baseline": start_ratio,
            "p99_ratio_vs_best_baseline_start": p99_ratio,
            "meets_target": start_ratio <= TARGET_START_RATIO and p99_ratio <= TARGET_P99_RATIO}


def per(results: dict[str, Result], attr: str) -> dict[str, float]:
    return {p: getattr(result, attr) for p, result in results.items()}


def trace_json(results: dict[str, Result]) -> dict[str, Any]:
    sf, p99 = per(results, "start_fraction"), per(results, "p99_ms")
    return {"start_fraction": sf, "p99_ms": p99, "p50_ms": per(results, "p50_ms"),
            "thaw_fraction": per(results, "thaw_fraction"), "cold_fraction": per(results, "cold_fraction"),
            "stopped_fraction": per(results, "stopped_fraction"), "refused": per(results, "refused"),
            "failed": per(results, "failed"), "utilisation": per(results, "utilisation"), **figures(sf, p99)}


def pooled(runs: dict[str, dict[str, Result]]) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """(start fraction, thaw fraction, p99) per policy over every trace's measured requests together."""
    sf, thaw, p99 = {}, {}, {}
    for p in next(iter(runs.values())):
        results = [runs[t][p] for t in runs]
        n = max(1, sum(r.requests for r in results))
        sf[p] = sum(r.starts for r in results) / n
        thaw[p] = sum(r.thaws for r in results) / n
        p99[p] = percentile(sorted(x for r in results for x in r.latencies), 99)
    return sf, thaw, p99


def result_json(cfg: Config, seed: int, n: int, runs: dict[str, dict[str, Result]]) -> dict[str, Any]:
    traces = {t: trace_json(results) for t, results in runs.items()}
    sf, thaw, p99 = pooled(runs)
    overall = figures(sf, p99)
    return {
        "bench": "sim", "seed": seed, "requests": n, "trace": list(runs),
        "start_fraction": sf, "p99_ms": p99, "thaw_fraction": thaw,
        # Worst trace: the target must hold on every trace shape.
        "start_ratio_vs_best_baseline": max(tr["start_ratio_vs_best_baseline"] for tr in traces.values()),
        "p99_ratio_vs_best_baseline_start": max(tr["p99_ratio_vs_best_baseline_start"] for tr in traces.values()),
        "meets_target": all(tr["meets_target"] for tr in traces.values()),
        "pooled": {k: overall[k] for k in ("best_baseline", "start_ratio_vs_best_baseline",
                                           "p99_ratio_vs_best_baseline_start")},
        "ratio_vs_least_loaded": ratio(sf["lukewarm"], sf["least_loaded"]) if "least_loaded" in sf else None,
        "ratio_vs_random": ratio(sf["lukewarm"], sf["random"]) if "random" in sf else None,
        "ratio_vs_best_baseline": overall["start_ratio_vs_best_baseline"], "best_baseline": overall["best_baseline"],
        "traces": traces,
        "config": dataclasses.asdict(cfg),
    }


HEADER = ["policy", "start frac", "cold", "stopped", "thaw", "p50 ms", "p99 ms", "mean ms", "cold starts", "dup",
          "boots", "thaws", "evicted", "ev running", "refused", "util"]


def table(results: dict[str, Result], shape: str = "") -> list[list[Any]]:
    rows: list[list[Any]] = []
    for p, r in results.items():
        c = r.counters
        rows.append([f"{shape} {p}".strip(), r.start_fraction, r.cold_fraction, r.stopped_fraction, r.thaw_fraction,
                     r.p50_ms, r.p99_ms, r.mean_ms, c.cold_starts, c.cold_dup, c.stopped_boots, c.thaws,
                     c.evicted, c.evicted_running, r.refused, r.utilisation])
    return rows


def ratio_rows(name: str, fig: dict[str, Any]) -> list[list[Any]]:
    verdict = "meets target" if fig["meets_target"] else "MISSES target"
    return [[f"{name} lukewarm / {fig['best_baseline']}: starts", f"{fig['start_ratio_vs_best_baseline']:.2f}",
             "p99", f"{fig['p99_ratio_vs_best_baseline_start']:.2f}", verdict]]


def report(rows: list[list[Any]], result: dict[str, Any]) -> None:
    """The table, then the JSON as the last line, like ``loadtests.common.report`` but with 5 digits:
    start fractions are tenths of a percent, which 3 digits would round away."""
    import orjson

    from loadtests.common import rounded

    cells = [[_cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(max(len(r) for r in cells))]
    for n, row in enumerate(cells):
        print("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print(orjson.dumps(rounded(result, 5)).decode(), flush=True)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4f}" if abs(value) < 1 else f"{value:.1f}"
    return str(value)


# ---- command line ------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = Config()
    parser = argparse.ArgumentParser(prog="python -m loadtests.sim", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--trace", default=",".join(TRACES), help=f"comma-separated shapes of {', '.join(TRACES)}")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--requests", type=int, default=30_000, help="requests per trace")
    parser.add_argument("--quick", action="store_true", help="8000 requests per trace (a smoke run)")
    parser.add_argument("--no-spread", action="store_true", help="lukewarm routes by choose_proxies alone")
    parser.add_argument("--policies", default=",".join(POLICIES),
                        help="comma-separated policies to run: lukewarm and at least one baseline (a big fleet's "
                             "run may leave out least_loaded and random, which start a third of requests anyway)")
    parser.add_argument("--warmup-ms", type=float, default=None,
                        help="leave out the requests of the first WARMUP_MS simulated ms (default: the first 10 %%)")
    for name in ("cold_ms", "stopped_ms", "thaw_ms", "load_ms", "warm_ms", "utilisation", "ms_per_s",
                 "idle_timeout_s", "pause_stop_after_s", "stop_remove_after_s", "zipf_s", "diurnal_ratio",
                 "diurnal_peak_utilisation", "burst_on_ms", "burst_off_ms", "burst_cap_cores"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(d, name))
    for name in ("models", "hosts", "max_replicas", "cores", "memory_budget_mb", "memory_mb", "capacity_max"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    args = parser.parse_args(argv)
    shapes = [s for s in args.trace.split(",") if s]
    if not shapes or set(shapes) - set(TRACES):
        parser.error(f"--trace takes some of {', '.join(TRACES)}")
    policies = [p for p in args.policies.split(",") if p]
    if set(policies) - set(POLICIES) or "lukewarm" not in policies or not set(policies) & set(BASELINES):
        parser.error(f"--policies takes lukewarm and at least one of {', '.join(BASELINES)}")
    return args


def config_from(args: argparse.Namespace) -> Config:
    fields = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in vars(args).items() if k in fields}, spread=not args.no_spread)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = config_from(args)
    n = 8000 if args.quick else args.requests
    shapes = [s for s in args.trace.split(",") if s]
    t0 = time.monotonic()
    policies = [p for p in args.policies.split(",") if p]
    runs = {shape: run_all(cfg, args.seed, n, shape, policies) for shape in shapes}
    result = result_json(cfg, args.seed, n, runs)
    left_out = f"after {cfg.warmup_ms:g} ms" if cfg.warmup_ms is not None else f"{int(n * (1 - cfg.warmup))}"
    print(f"sim: seed {args.seed}, {n} requests per trace ({left_out} measured), {cfg.models} models "
          f"(Zipf s={cfg.zipf_s}), {cfg.hosts} hosts x {cfg.cores} cores, {cfg.max_replicas} replicas / "
          f"{cfg.memory_budget_mb} MB; idle {cfg.idle_ms:.0f} ms, stop after {cfg.stop_ms:.0f} ms more, remove after "
          f"{cfg.remove_ms:.0f} ms more; starts thaw {cfg.thaw_ms} / stopped {cfg.stopped_ms + cfg.load_ms} / cold "
          f"{cfg.cold_ms + cfg.load_ms} ms; a start = waited for a stopped or cold start; "
          f"{time.monotonic() - t0:.1f} s")
    rows: list[list[Any]] = [HEADER]
    for shape, results in runs.items():
        rows += table(results, shape)
        rows += ratio_rows(shape, result["traces"][shape])
    rows += ratio_rows("pooled", {**result["pooled"], "meets_target": result["meets_target"]})
    report(rows, result)


if __name__ == "__main__":
    main()
