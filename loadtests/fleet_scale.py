"""Fleet scale: what routing, heartbeat intake and Redis cost an ingress as the fleet grows (10 → 5000 proxies).

Synthetic fleets of ``--sizes`` proxies (16 replicas each over ``--versions`` versions), measured in one run:

- ``route_us``: µs per routing decision, ``choose_proxies(view.candidates(...))`` (the index: the version's
  holders, at most ``RANKED_HOLDERS`` of them drawn warm first, + d sampled hosts with room unless a holder
  has a warm slot free: what the dispatcher ranks for a one-chunk request with none of its version in
  flight); baseline ``route_old_us``, ``choose_proxies(view.live_proxies())``
  (every proxy, every replica: what the dispatcher did per request), and the ratio. Requests pick versions
  by the same Zipf popularity the replicas were placed by; a version has at most ``--max-holders``
  replicas (its capacity.max). ``route_wide_us``: a version held by every proxy (up to 1000, capacity.max's
  limit). These, ``beat_us`` and ``view_mb`` are taken in a fresh process per fleet (``figures_of``).
- ``beat_us``: µs per heartbeat applied to the view (orjson + ``ProxyState.from_heartbeat`` + the index),
  and the old full poll's synchronous block (parse every heartbeat, rebuild the fleet) as the baseline.
- ``stall_ms``: the longest the event loop was held by one callback while the fleet's heartbeats arrive
  and the ingress routes ``--rps`` requests a second (``RequestLoad``): a writer process beats every
  proxy every 2 s into a throwaway Redis (SET with TTL + ZADD, as ``runtime_proxy/heartbeat.py``), the
  view polls it every second (``view.refresh``), with the heap kept as the ingress keeps it
  (``shared/heap.py``; ``--no-heap-keeper``: without) and its memory laid out as the ingress's
  (``shared/hugeheap.py``: this process starts again on the huge-page heap, and the new poll runs with the
  heap's frontier kept resident; ``LUKEWARM_HUGE_PAGES=0``: 4 KiB pages, as before). Measured by timing
  every callback the loop runs
  (``Handle._run``); ``stall_ms`` is the loop thread's CPU time in the longest one (what the code holds
  the loop for), ``stall_wall_ms`` its wall time (includes the OS preempting this process on a busy
  machine); the log names where the longest one's task then waited, and the longest collection.
  ``intake_stall_ms``: the longest callback not a request's own (the poll's slices, the heap keeper, the
  sockets' readers), ``request_step_ms`` the longest of the requests' own steps (a routing decision and a
  Redis command's send): ``stall_ms`` is the larger of the two.
  ``idle_stall_ms`` and ``idle_lag_ms``: the same with no requests. ``full_gc_ms``: the keeper's scheduled
  full pass, once, over this process's heap. Baseline: the old poll (``Registry.list_proxies`` + a full
  rebuild), same writer, same load, same duration. ``lag_ms``: the same stalls as a 1 ms sleep sees them (how late
  it wakes; wall time), the one figure that also works with ``--uvloop`` (the daemons' loop, whose
  callbacks do not go through ``Handle._run``: there ``stall_ms`` reads 0). The lag probe's own steps are
  left out of ``stall_ms`` (no ingress runs them) and reported as ``probe_step_ms``: a step of a few lines,
  so its longest is the CPU time this machine charges now and then to whatever runs (``StallMeter``).
- ``idle_touch_us``: this machine's price for touching a 4 KiB page of memory back to back and after 1 s
  idle, and after 1 s idle where the memory lies on 2 MiB pages (``idle_touch_us()``): the stalls are steps
  that run once a poll and pay it, so read them beside it. ``huge_heap``: whether this run's heap lay on
  huge pages; ``heap_settle_ms``: its start-up reserve grown and faulted in (``HeapFrontier.settle``,
  once, before an ingress serves: counted in no stall).
- ``view_mb``: the view's memory for the fleet (tracemalloc), and the index's share of it.
- Redis: keys and bytes per 1000 proxies (``MEMORY USAGE``), per 1000 versions (created through
  ``Registry.create_version``), heartbeat bytes, commands and bytes an ingress reads per second, pub/sub
  messages per second per ingress caused by the fleet (none: heartbeats do not go over pub/sub) and per
  version deployed, Redis CPU per second of fleet.

Prints a table, then the JSON line ``{"bench": "fleet_scale", "route_us": {"10": …}, "stall_ms": {…}, …}``.
"""
from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import ctypes
import dataclasses
import gc
import mmap
import os
import random
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import redis
import redis.asyncio as aredis

from ingress import heartbeats
from ingress.index import FleetIndex
from ingress.registry import Registry
from ingress.router import ProxyState, ReplicaState, StartCosts, choose_proxies
from ingress.view import PROXY_MAX_AGE_S, SAMPLE_D, StateView, parse_heartbeat
from loadtests.common import log, report, run_async, throwaway_redis
from shared import keys
from shared.background import Periodic, cancel_and_wait
from shared.heap import YOUNG_EVERY_S, HeapKeeper
from shared.hugeheap import FRONTIER_EVERY_S, HeapFrontier, exec_on_huge_heap, on_huge_heap

REPLICAS = 16
BEAT_INTERVAL_S = 2.0  # runtime_proxy's heartbeat_interval_s
BEAT_TTL_MS = 10_000
POLL_S = 1.0  # the ingress's view_poll_interval_s
NOW = 1_000_000.0
STATES = ("running", "running", "paused", "stopped", "running")


# ---- the synthetic fleet ------------------------------------------------------------------------


def version_key(i: int) -> str:
    return f"cust{i % 997}/model{i}/main/1"


class Popularity:
    """Zipf (s = 1) over ``n`` versions: which versions hold replicas, and which requests come."""

    def __init__(self, n: int) -> None:
        total, self.cdf = 0.0, []
        for rank in range(1, n + 1):
            total += 1.0 / rank
            self.cdf.append(total)
        self.total = total

    def draw(self, rng: random.Random) -> int:
        return min(bisect.bisect_left(self.cdf, rng.random() * self.total), len(self.cdf) - 1)


def place(proxies: int, versions: int, max_holders: int, pop: Popularity, rng: random.Random) -> list[list[int]]:
    """16 distinct versions per proxy, popular ones first, none on more than ``max_holders`` proxies."""
    holders = [0] * versions
    out = []
    for _ in range(proxies):
        mine: set[int] = set()
        while len(mine) < REPLICAS:
            v = pop.draw(rng)
            if v in mine or holders[v] >= max_holders:
                v = rng.randrange(versions)
                if v in mine or holders[v] >= max_holders:
                    continue
            mine.add(v)
            holders[v] += 1
        out.append(sorted(mine))
    return out


def heartbeat(pid: str, placed: list[int], ts: float, rng: random.Random) -> dict[str, Any]:
    """A heartbeat as a real proxy sends it (``ProxyHeartbeat.to_dict``): every field filled."""
    replicas = []
    for n, v in enumerate(placed):
        state = STATES[(n + int(ts)) % len(STATES)] if rng.random() < 0.1 else STATES[n % len(STATES)]
        replicas.append({
            "replica_id": f"{pid}-r{n}", "version": version_key(v), "state": state,
            "in_flight": rng.randrange(2) if state == "running" else 0, "concurrency": 1,
            "idle_s": round(rng.random() * 60, 3), "memory_mb": 512, "cpus": 1.0, "gpu": False, "gpu_uuid": None,
            "memory_used_mb": round(100 + rng.random() * 300, 1), "cpu_s": round(rng.random() * 1000, 2)})
    return {"proxy_id": pid, "url": f"http://10.0.{hash(pid) % 250}.{hash(pid) % 199}:8081", "epoch": 1_700_000_000_000,
            "ts": ts, "runtime": "docker", "started_at": ts - 3600,
            "capacity": {"max_replicas": REPLICAS + 4, "replica_concurrency": 1, "cpus": 32.0, "load1": 3.5,
                         "memory_mb": 128000, "memory_available_mb": 64000, "memory_budget_mb": 120000,
                         "max_replicas_per_customer": 0},
            "replicas": replicas, "waiting": {}, "gpus": [], "nvml": "no NVIDIA driver",
            "images": [f"lukewarm-cust{v % 997}/model{v}:1" for v in placed[:8]]}


class Fleet:
    def __init__(self, size: int, versions: int, max_holders: int, pop: Popularity, seed: int) -> None:
        self.rng = random.Random(seed)
        self.ids = [f"proxy-{i:05}" for i in range(size)]
        self.placed = place(size, versions, max_holders, pop, self.rng)

    def beats(self, ts: float) -> list[dict[str, Any]]:
        return [heartbeat(pid, placed, ts, self.rng) for pid, placed in zip(self.ids, self.placed)]


# ---- what the ingress did before the index (the in-run baselines) -------------------------------


def legacy_apply(view: StateView, beats: list[dict[str, Any]]) -> dict[str, ProxyState]:
    """The old ``StateView.apply_heartbeats``: the whole fleet parsed and rebuilt at each poll."""
    fresh: dict[str, ProxyState] = {}
    for beat in beats:
        try:
            state = ProxyState.from_heartbeat(beat)
        except (KeyError, TypeError, ValueError):
            continue
        if state.epoch < view.epochs.get(state.proxy_id, 0):
            continue
        view.epochs[state.proxy_id] = state.epoch
        fresh[state.proxy_id] = state
    return fresh


async def legacy_refresh(view: StateView, registry: Registry, read: list[int]) -> None:
    """The old poll: ``Registry.list_proxies`` (ZRANGE of every id, one MGET of every heartbeat, orjson
    each, in one step) and the whole fleet rebuilt."""
    ids: list[Any] = list(await registry.redis.zrange(keys.PROXIES, 0, -1))
    raws: list[Any] = await registry.redis.mget([keys.proxy_heartbeat(i.decode()) for i in ids]) if ids else []
    read[0] += sum(len(r) for r in raws if r)
    view.proxies = legacy_apply(view, [orjson.loads(r) for r in raws if r is not None])  # type: ignore[assignment]


# ---- in-process figures: routing, per-heartbeat cost, memory -------------------------------------


@contextlib.contextmanager
def settled_heap(keep: bool = True) -> Iterator[None]:
    """The heap as a running ingress has it: no automatic full collection (``shared.heap.HeapKeeper``),
    so the collector's passes walk only young objects. ``keep=False``: as before the keeper (a pass may
    walk the whole view). Restored after: each figure starts alike."""
    heap = HeapKeeper()
    gc.collect()
    if keep:
        heap.install()
    try:
        yield
    finally:
        heap.uninstall()


def timed_calls(fn: Callable[[int], object], min_calls: int, max_calls: int, min_s: float) -> float:
    """µs per call of ``fn(i)``: at least ``min_calls`` and ``min_s``, at most ``max_calls``."""
    calls, started = 0, time.perf_counter()
    while calls < max_calls and (calls < min_calls or time.perf_counter() - started < min_s):
        fn(calls)
        calls += 1
    return (time.perf_counter() - started) / calls * 1e6


def route_figures(view: StateView, pop: Popularity, versions: int, seed: int, min_s: float) -> dict[str, float]:
    rng = random.Random(seed)
    wanted = [version_key(pop.draw(rng)) for _ in range(4096)]
    cold = version_key(versions + 1)  # held nowhere: d sampled hosts only
    hottest = max((version_key(i) for i in range(min(versions, 200))), key=lambda v: len(view.proxies.holders(v)))
    costs = StartCosts()

    def new(i: int, v: str | None = None) -> object:
        key = v or wanted[i % len(wanted)]
        return choose_proxies(view.candidates(key, rng, now=NOW, cold_if_busy=True), key, NOW, rng, costs)

    def old(i: int) -> object:
        key = wanted[i % len(wanted)]
        return choose_proxies(view.live_proxies(), key, NOW, rng, costs)

    figures = {
        "route_us": timed_calls(new, 2000, 200_000, min_s),
        "route_old_us": timed_calls(old, 5, 20_000, min_s),
        "route_cold_us": timed_calls(lambda i: new(i, cold), 1000, 100_000, min_s / 3),
        "route_hot_us": timed_calls(lambda i: new(i, hottest), 1000, 100_000, min_s / 3),
        "hot_holders": len(view.proxies.holders(hottest)),
        "running_of_us": timed_calls(lambda i: view.running_of(wanted[i % len(wanted)]), 1000, 200_000, min_s / 3),
        "running_old_us": timed_calls(lambda i: sum(1 for p in view.live_proxies() for r in p.replicas
                                                    if r.version == wanted[i % len(wanted)]
                                                    and r.state in ("running", "starting")), 5, 20_000, min_s / 3),
    }
    return figures | wide_figures(view, rng, costs, min_s / 3)


WIDE = "cust0/wide/main/1"


def wide_figures(view: StateView, rng: random.Random, costs: StartCosts, min_s: float) -> dict[str, float]:
    """A version scaled out to every proxy (at most 1000, capacity.max's limit), one in four replicas of
    it paused: µs per decision, and ranking every holder (what a decision did before ``RANKED_HOLDERS``)."""
    for n, pid in enumerate(list(view.proxies)[:1000]):
        p = view.proxies[pid]
        extra = ReplicaState(WIDE, "paused" if n % 4 == 3 else "running", n % 2, 1)
        view.proxies[pid] = dataclasses.replace(p, replicas=(*p.replicas, extra))

    def every_holder(i: int) -> object:
        held = view.proxies.holders(WIDE)
        skip = {p.proxy_id for p in held}
        return choose_proxies(held + view.proxies.sample(rng, SAMPLE_D, NOW, PROXY_MAX_AGE_S, skip), WIDE,
                              NOW, rng, costs)

    return {
        "wide_holders": float(len(view.proxies.holders(WIDE))),
        "route_wide_us": timed_calls(lambda i: choose_proxies(view.candidates(WIDE, rng, now=NOW), WIDE, NOW, rng,
                                                              costs), 1000, 100_000, min_s),
        "route_wide_all_us": timed_calls(every_holder, 20, 20_000, min_s),
    }


def beat_figures(fleet: Fleet, view: StateView, min_s: float) -> dict[str, float]:
    """µs per heartbeat applied (raw bytes → view + index), and the old poll's one synchronous block."""
    raws = [orjson.dumps(b) for b in fleet.beats(NOW + 1)]
    ids = fleet.ids
    n = len(raws)

    def apply(i: int) -> object:
        view._take_parsed(ids[i % n], parse_heartbeat(raws[i % n]), False)
        return None

    per_beat = timed_calls(apply, max(n, 2000), 200_000, min_s)
    gc.collect()
    started = time.perf_counter()
    beats = [orjson.loads(r) for r in raws]  # what Registry.list_proxies did with the MGET reply
    legacy_apply(view, beats)
    return {"beat_us": per_beat, "old_poll_block_ms": (time.perf_counter() - started) * 1e3}


def memory_figures(fleet: Fleet) -> dict[str, float]:
    beats = fleet.beats(NOW)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    plain = {b["proxy_id"]: ProxyState.from_heartbeat(b) for b in beats}
    states_bytes = tracemalloc.get_traced_memory()[0] - base
    index = FleetIndex(plain)
    total = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del index, plain
    return {"view_mb": total / 2**20, "index_mb": (total - states_bytes) / 2**20}


# ---- with Redis: stalls while heartbeats arrive, what Redis and the ingress pay ------------------


def writer_main(url: str, size: int, versions: int, max_holders: int, seconds: float, seed: int) -> None:
    """The fleet's proxies (a separate process): every heartbeat once at once, then each every 2 s."""
    fleet = Fleet(size, versions, max_holders, Popularity(versions), seed)
    client = redis.Redis.from_url(url)

    def beat(pids: list[int]) -> None:
        pipe = client.pipeline(transaction=False)
        now = time.time()
        for i in pids:
            body = heartbeat(fleet.ids[i], fleet.placed[i], now, fleet.rng)
            pipe.set(keys.proxy_heartbeat(fleet.ids[i]), orjson.dumps(body), px=BEAT_TTL_MS)
            pipe.zadd(keys.PROXIES, {fleet.ids[i]: now})
        pipe.execute()

    for start in range(0, size, 200):
        beat(list(range(start, min(size, start + 200))))
    print("ready", flush=True)
    tick_s, next_i, began = 0.02, 0, time.monotonic()
    per_tick = size * tick_s / BEAT_INTERVAL_S
    owed = 0.0
    while time.monotonic() - began < seconds:
        owed += per_tick
        batch = [(next_i + k) % size for k in range(int(owed))]
        owed -= len(batch)
        next_i = (next_i + len(batch)) % size
        if batch:
            beat(batch)
        time.sleep(tick_s)
    client.close()


def _where(handle: asyncio.events.Handle) -> str:
    """Where the task a callback stepped now waits: its innermost three frames."""
    task = getattr(getattr(handle, "_callback", None), "__self__", None)
    coro: Any = task.get_coro() if isinstance(task, asyncio.Task) else None
    frames = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        frames.append(f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return " > ".join(frames[-3:]) or repr(handle)[:80]


class StallMeter:
    """Times every callback the event loop runs (each task step, each reader): the longest holds.

    Also times the cyclic garbage collector (``gc.callbacks``): a collection runs inside whichever
    callback allocated last, and its pause is reported apart (``gc_max_ms``), and subtracted from the
    callback it fell in for ``max_code_s`` (what the code itself holds the loop for).

    The steps of the measuring apparatus's own tasks (``leave_out``: the lag probe, a thousand a second)
    are timed apart, in ``max_apparatus_s``: no ingress runs them, and as they run a few lines each, the
    longest says how much CPU time this machine charges a trivial step now and then (interrupts, the
    hypervisor): 2-3 ms seen here on a 2-vCPU VM.

    The requests' own steps (``count_apart``: ``RequestLoad``'s task) count in ``max_cpu_s`` like any
    other and are also kept apart in ``max_apart_s``, and ``max_rest_s`` is the longest of the others
    (the poll, the heap keeper, the sockets' readers): which of the two held the loop longest.
    """

    def __init__(self) -> None:
        self.max_wall_s = self.max_cpu_s = self.max_code_s = self.max_gc_s = 0.0
        self.callbacks = 0
        self.max_gc_generation = -1
        self.worst = ""  # where the longest callback's task stopped (file:line of its innermost frames)
        self.max_apparatus_s = 0.0
        self._apparatus: set[object] = set()
        self.max_apart_s = self.max_rest_s = 0.0
        self._apart: set[object] = set()
        self._orig: Any = None
        self._gc_in_step = 0.0
        self._gc_start = 0.0

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_start = time.thread_time()
        else:
            took = time.thread_time() - self._gc_start
            self._gc_in_step += took
            if took > self.max_gc_s:
                self.max_gc_s, self.max_gc_generation = took, info["generation"]

    def leave_out(self, task: asyncio.Task[Any] | None) -> None:
        self._apparatus.add(task)

    def count_apart(self, task: asyncio.Task[Any] | None) -> None:
        if task is not None:
            self._apart.add(task)

    def __enter__(self) -> StallMeter:
        self._orig = orig = asyncio.events.Handle._run
        meter = self

        def run(handle: asyncio.events.Handle) -> None:
            meter._gc_in_step = 0.0
            w, c = time.perf_counter(), time.thread_time()
            orig(handle)
            cpu = time.thread_time() - c
            owner = getattr(getattr(handle, "_callback", None), "__self__", None)
            if owner in meter._apparatus:
                meter.max_apparatus_s = max(meter.max_apparatus_s, cpu)
                return
            if owner in meter._apart:
                meter.max_apart_s = max(meter.max_apart_s, cpu)
            else:
                meter.max_rest_s = max(meter.max_rest_s, cpu)
            meter.max_wall_s = max(meter.max_wall_s, time.perf_counter() - w)
            if cpu > meter.max_cpu_s:
                meter.max_cpu_s, meter.worst = cpu, _where(handle)
            meter.max_code_s = max(meter.max_code_s, cpu - meter._gc_in_step)
            meter.callbacks += 1

        asyncio.events.Handle._run = run  # type: ignore[method-assign,assignment]
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.events.Handle._run = self._orig  # type: ignore[method-assign]
        gc.callbacks.remove(self._on_gc)


class LagProbe:
    """The loop's lateness as a task sees it: a sleep of ``PROBE_S`` that wakes late was held up by whatever
    ran meanwhile. Wall time, and it works on any loop (uvloop's callbacks bypass ``StallMeter``)."""

    PROBE_S = 0.001

    def __init__(self) -> None:
        self.max_lag_s = 0.0
        self._task: asyncio.Task[None] | None = None
        self._stop = False

    async def _run(self) -> None:
        while not self._stop:
            t = time.perf_counter()
            await asyncio.sleep(self.PROBE_S)
            self.max_lag_s = max(self.max_lag_s, time.perf_counter() - t - self.PROBE_S)

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    def __enter__(self) -> LagProbe:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True  # the task ends at its next wake-up (within PROBE_S)


class RequestLoad:
    """The ingress's own traffic while it polls: ``rps`` requests a second, each one routing decision over
    the view (a Zipf-drawn version) and one Redis read (what a request costs the loop besides the hop:
    the key lookup, the request log's flushes). A stall only hurts a loop that is serving requests, and
    an idle loop's first steps after a pause run from cold CPU caches: on this VM a Redis command after
    200 ms idle costs ~1.6 ms of CPU, ~0.3 ms when commands come every few ms. So the goal is judged
    under this load, and the idle figures are reported beside it."""

    def __init__(self, view: StateView, client: aredis.Redis, pop: Popularity, rps: float, seed: int) -> None:
        self.view, self.client, self.pop, self.rps = view, client, pop, rps
        self.rng = random.Random(seed)
        self.requests = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def _run(self) -> None:
        costs, period = StartCosts(), 1.0 / self.rps
        began = time.monotonic()
        while not self._stopping:  # the flag too: redis-py can swallow a cancellation during a read
            key = version_key(self.pop.draw(self.rng))
            choose_proxies(self.view.candidates(key, self.rng, now=time.time(), cold_if_busy=True), key, time.time(),
                           self.rng, costs)
            await self.client.get(key)
            self.requests += 1
            await asyncio.sleep(max(0.0, began + self.requests * period - time.monotonic()))

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    async def __aenter__(self) -> RequestLoad:
        if self.rps > 0:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stopping = True
        if self._task is not None:
            # Awaited, whatever it ends with: a command cut by the cancellation may end it with redis-py's
            # ConnectionError instead, which would otherwise be printed after the JSON line.
            await asyncio.gather(cancel_and_wait(self._task), return_exceptions=True)


def command_calls(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def redis_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def run_polls(url: str, size: int, args: argparse.Namespace, legacy: bool, pop: Popularity,
                    rps: float) -> dict[str, float]:
    """Start the writer, follow the fleet with the view for ``seconds`` while ``rps`` requests a second
    are routed (``RequestLoad``; 0: an idle loop), under the stall meter."""
    sync = redis.Redis.from_url(url)
    sync.flushdb()
    writer = subprocess.Popen(
        [sys.executable, "-m", "loadtests.fleet_scale", "--writer", "--redis-url", url, "--sizes", str(size),
         "--versions", str(args.versions), "--max-holders", str(args.max_holders),
         "--seconds", str(args.seconds + 5), "--seed", str(args.seed)],
        stdout=subprocess.PIPE, text=True)
    client = aredis.Redis.from_url(url)
    fetched_bytes = [0]
    real_fetch = heartbeats.fetch

    async def counting_fetch(c: Any, ids: Any) -> list[bytes | None]:
        raws = await real_fetch(c, ids)
        fetched_bytes[0] += sum(len(r) for r in raws if r)
        return raws

    # As the ingress runs (ingress/app.py); the old poll's baseline ran without it.
    heap = None if legacy or args.no_heap_keeper else HeapKeeper()
    young: Periodic | None = None
    frontier = None if legacy else HeapFrontier()
    frontier_rounds: Periodic | None = None
    try:
        assert writer.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(writer.stdout.readline), 120)
        if line.strip() != "ready":
            raise RuntimeError(f"the heartbeat writer did not start: {line!r}")
        # The pool's connections are set up before (a running ingress has them; opening one holds the loop
        # ~2 ms): as many as the poll and the requests use at once.
        await asyncio.gather(*(client.ping() for _ in range(4)))
        registry = Registry(client)
        view = StateView(registry)
        heartbeats.fetch = counting_fetch  # type: ignore[assignment]
        # As the ingress runs (ingress/app.py: settle_after_startup, then the keeper's rounds); the old
        # poll's baseline ran without them.
        gc.collect()
        if heap is not None:
            heap.install()
            young = Periodic("heap-young", YOUNG_EVERY_S, heap.run_young_round)
            young.start()
        # The first poll of a new ingress reads the whole fleet and runs every code path for the first time
        # (imports done on first use, first parses): timed apart, the steady state is what is measured.
        with StallMeter() as first:
            await (legacy_refresh(view, registry, fetched_bytes) if legacy else view.refresh())
        fetched_bytes[0] = 0
        settle_ms = 0.0
        if frontier is not None:  # as the ingress: after its first poll, before it serves
            # In a callback of its own: the one the first poll's meter saw end would be charged for it.
            await asyncio.sleep(0)
            began = time.perf_counter()
            frontier.settle()
            settle_ms = (time.perf_counter() - began) * 1e3
            frontier_rounds = Periodic("heap-frontier", FRONTIER_EVERY_S, frontier.run_round)
            frontier_rounds.start()
        calls0, cpu0 = command_calls(sync), redis_cpu_s(sync)
        polls, started = 0, time.monotonic()
        probe = LagProbe()
        load = RequestLoad(view, client, pop, rps, args.seed)
        with StallMeter() as meter, probe:
            meter.leave_out(probe.task)
            async with load:
                meter.count_apart(load.task)
                while time.monotonic() - started < args.seconds:
                    began = time.monotonic()
                    await (legacy_refresh(view, registry, fetched_bytes) if legacy else view.refresh())
                    polls += 1
                    await asyncio.sleep(max(0.0, POLL_S - (time.monotonic() - began)))
        elapsed = time.monotonic() - started
        full_ms = 0.0
        if heap is not None:  # the keeper's scheduled full pass (every 10 min), over this heap
            heap.round()
            full_ms = heap.last_full_ms
        calls = {k: v - calls0.get(k, 0) for k, v in command_calls(sync).items()}
        log(f"  longest callback {meter.max_cpu_s * 1e3:.2f} ms CPU, then waiting at {meter.worst}; longest "
            f"collection {meter.max_gc_s * 1e3:.2f} ms (generation {meter.max_gc_generation}); longest step of "
            f"the lag probe (a few lines: this machine's noise) {meter.max_apparatus_s * 1e3:.2f} ms")
        out = {"stall_ms": meter.max_cpu_s * 1e3, "stall_wall_ms": meter.max_wall_s * 1e3,
               "first_poll_stall_ms": first.max_cpu_s * 1e3, "heap_settle_ms": settle_ms,
               "stall_code_ms": meter.max_code_s * 1e3, "gc_max_ms": meter.max_gc_s * 1e3, "polls": polls,
               "seen": len(view.proxies), "redis_cpu_per_s": (redis_cpu_s(sync) - cpu0) / elapsed,
               "read_kb_per_s": fetched_bytes[0] / 1024 / elapsed,
               "ingress_cmds_per_poll": (calls.get("zrange", 0) + calls.get("mget", 0)) / max(1, polls),
               "lag_ms": probe.max_lag_s * 1e3, "load_rps": load.requests / elapsed, "full_gc_ms": full_ms,
               "probe_step_ms": meter.max_apparatus_s * 1e3, "request_step_ms": meter.max_apart_s * 1e3,
               "intake_stall_ms": meter.max_rest_s * 1e3}
        if not legacy:
            out.update(redis_costs(sync, size))
        return out
    finally:
        if frontier_rounds is not None:
            await frontier_rounds.stop()
        if young is not None:
            await young.stop()
        if heap is not None:
            heap.uninstall()
        heartbeats.fetch = real_fetch  # type: ignore[assignment]
        writer.terminate()
        writer.wait(10)
        await client.aclose()
        sync.close()


def redis_costs(sync: redis.Redis, size: int) -> dict[str, float]:
    """Keys and bytes per 1000 proxies: each proxy's heartbeat key and epoch counter, its lw:proxies entry."""
    ids = [bytes(m).decode() for m in list(sync.zrange(keys.PROXIES, 0, -1))]  # type: ignore[arg-type]
    sample = ids[:: max(1, len(ids) // 200)]
    beat_bytes = sum(int(sync.memory_usage(keys.proxy_heartbeat(p)) or 0) for p in sample) / max(1, len(sample))
    value_bytes = sum(int(sync.strlen(keys.proxy_heartbeat(p))) for p in sample) / max(1, len(sample))
    zset = int(sync.memory_usage(keys.PROXIES) or 0)
    sync.set(keys.proxy_epoch("proxy-probe"), 1_700_000_000_000)  # the writer takes no epochs: cost one
    epoch_bytes = int(sync.memory_usage(keys.proxy_epoch("proxy-probe")) or 0)
    sync.delete(keys.proxy_epoch("proxy-probe"))
    beat_keys = int(sync.dbsize()) - 1  # all but lw:proxies
    per_proxy = beat_bytes + zset / max(1, size) + epoch_bytes
    return {"heartbeat_bytes": value_bytes, "redis_keys_per_1000_proxies": (beat_keys / max(1, size) + 1) * 1000,
            "redis_kb_per_1000_proxies": per_proxy * 1000 / 1024}


async def version_costs(url: str, n: int) -> dict[str, float]:
    """Keys, bytes and pub/sub messages per 1000 versions deployed (10 versions per branch)."""
    sync = redis.Redis.from_url(url)
    sync.flushdb()
    client = aredis.Redis.from_url(url)
    pubsub = client.pubsub()
    await pubsub.subscribe(keys.EVENTS_CHANNEL)
    await pubsub.get_message(timeout=1.0)
    try:
        mem0, keys0 = int(sync.info("memory")["used_memory"]), int(sync.dbsize())
        registry = Registry(client)
        for i in range(n):
            await registry.create_version("cust", f"model{i // 10}", "main",
                                          {"image": f"lukewarm-cust/model{i // 10}:{i % 10}"})
        messages = 0
        while await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2) is not None:
            messages += 1
        mem, count = int(sync.info("memory")["used_memory"]) - mem0, int(sync.dbsize()) - keys0
        return {"redis_keys_per_1000_versions": count * 1000 / n, "redis_kb_per_1000_versions": mem / n * 1000 / 1024,
                "pubsub_msgs_per_version_deployed": messages / n}
    finally:
        await pubsub.aclose()
        await client.aclose()
        sync.flushdb()
        sync.close()


# ---- the run -------------------------------------------------------------------------------------


def in_process_figures(size: int, args: argparse.Namespace) -> dict[str, float]:
    """Routing, per-heartbeat and memory figures of one fleet (run in a process of its own: ``--figures``)."""
    pop = Popularity(args.versions)
    log(f"fleet of {size}: building {size * REPLICAS} replicas over {args.versions} versions")
    fleet = Fleet(size, args.versions, args.max_holders, pop, args.seed)
    view = StateView(Registry(None))  # type: ignore[arg-type]
    view.apply_heartbeats(fleet.beats(NOW))
    figures = {"versions_held": float(view.proxies.versions())}
    with settled_heap(not args.no_heap_keeper):
        figures |= route_figures(view, pop, args.versions, args.seed, args.route_s)
        figures |= beat_figures(fleet, view, args.route_s)
    figures |= memory_figures(fleet)
    log(f"fleet of {size}: route {figures['route_us']:.1f} µs (old {figures['route_old_us']:.0f} µs), "
        f"beat {figures['beat_us']:.1f} µs")
    return figures


def figures_of(size: int, args: argparse.Namespace) -> dict[str, float]:
    """``in_process_figures`` in a fresh process: each fleet's view is laid out in a heap of its own, as an
    ingress following that fleet has it. Built one after another in one process, the last fleet's view
    was scattered among what the earlier ones left in the allocator's arenas, and its decisions paid
    that in cache misses (route at 5000 proxies 14 µs against 11 in a fresh process)."""
    command = [sys.executable, "-m", "loadtests.fleet_scale", "--figures", "--sizes", str(size),
               "--versions", str(args.versions), "--max-holders", str(args.max_holders),
               "--route-s", str(args.route_s), "--seed", str(args.seed)]
    if args.no_heap_keeper:
        command.append("--no-heap-keeper")
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True, timeout=1800)
    return orjson.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def idle_touch_us(pages: int = 2048, idle_s: float = 1.0, rounds: int = 3) -> dict[str, float]:
    """This machine's price for touching memory left alone: µs per 4 KiB page read and written back to back,
    and after ``idle_s`` asleep (the median of ``rounds``), on 4 KiB pages and on 2 MiB ones (the same
    touches over memory madvised ``MADV_HUGEPAGE``; equal to the 4 KiB figure where the kernel's THP is
    off). Stalls are steps that run once a poll, so they pay it: on the 2-vCPU VM this was written on,
    0.05 µs back to back and 1.4-16 µs after 1 s (30 November) on 4 KiB pages, 0.14-0.52 µs on 2 MiB ones."""
    huge = 2 << 20
    # Private: a shared anonymous mapping is shmem, which THP's shmem setting (commonly never) governs.
    buf = mmap.mmap(-1, pages * 4096 + huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = memoryview(buf)
    # The first 2 MiB boundary inside the mapping: THP backs only aligned 2 MiB ranges.
    start = -ctypes.addressof(ctypes.c_char.from_buffer(buf)) % huge
    region = view[start:start + pages * 4096]

    def touch() -> float:
        started = time.perf_counter()
        for i in range(0, pages * 4096, 4096):
            region[i] += 1
        return (time.perf_counter() - started) / pages * 1e6

    def after_idle() -> float:
        for i in range(0, pages * 4096, 4096):
            region[i] = 1
        touch()
        idle = []
        for _ in range(rounds):
            time.sleep(idle_s)
            idle.append(touch())
        return statistics.median(idle)

    try:
        buf.madvise(mmap.MADV_NOHUGEPAGE)
        small = after_idle()
        warm = statistics.median(touch() for _ in range(rounds))
        buf.madvise(mmap.MADV_HUGEPAGE)  # new pages from here on are huge: zap the old ones first
        buf.madvise(mmap.MADV_DONTNEED)
        large = after_idle()
    finally:
        region.release()
        view.release()
        buf.close()
    return {"warm": round(warm, 3), f"after_{idle_s:g}s": round(small, 3), f"after_{idle_s:g}s_huge": round(large, 3)}


async def measure(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    pop = Popularity(args.versions)
    machine = idle_touch_us()
    log(f"this machine: touching a 4 KiB page costs {machine['warm']} µs back to back, {machine['after_1s']} µs "
        f"after 1 s idle, {machine['after_1s_huge']} µs on 2 MiB pages (what steps that run once a poll pay); "
        f"this run's heap on huge pages: {on_huge_heap(os.environ)}")
    per = {size: figures_of(size, args) for size in sizes}
    async with (throwaway_redis() if not args.redis_url else _given(args.redis_url)) as url:
        versions = await version_costs(url, args.deploy_versions)
        for size in sizes:
            for prefix, legacy, rps in (("", False, args.rps), ("idle_", False, 0.0), ("old_", True, args.rps)):
                log(f"fleet of {size}: heartbeats arriving for {args.seconds} s, {'old' if legacy else 'new'} poll, "
                    f"{rps:g} requests/s")
                got = await run_polls(url, size, args, legacy, pop, rps)
                per[size] |= {prefix + k: v for k, v in got.items()}
    publish(sizes, per, versions | {"idle_touch_us": machine}, args)


class _given:
    def __init__(self, url: str) -> None:
        self.url = url

    async def __aenter__(self) -> str:
        return self.url

    async def __aexit__(self, *exc: object) -> None:
        redis.Redis.from_url(self.url).flushdb()


def publish(sizes: list[int], per: dict[int, dict[str, float]], versions: dict[str, Any],
            args: argparse.Namespace) -> None:
    rows: list[list[Any]] = [["proxies", "route µs", "old µs", "ratio", "cold µs", "hot µs (holders)",
                              "wide µs (holders)", "wide, all ranked µs",
                              "beat µs", "old poll ms", "stall ms", "intake ms", "request ms", "code ms", "gc ms", "wall ms", "lag ms", "idle stall ms", "full gc ms",
                              "old stall ms", "view MB",
                              "read kB/s", "Redis CPU"]]
    for s in sizes:
        f = per[s]
        rows.append([s, f["route_us"], f["route_old_us"], f["route_old_us"] / f["route_us"], f["route_cold_us"],
                     f"{f['route_hot_us']:.1f} ({int(f['hot_holders'])})",
                     f"{f['route_wide_us']:.1f} ({int(f['wide_holders'])})", f["route_wide_all_us"],
                     f["beat_us"], f["old_poll_block_ms"],
                     f["stall_ms"], f["intake_stall_ms"], f["request_step_ms"], f["stall_code_ms"], f["gc_max_ms"], f["stall_wall_ms"], f["lag_ms"],
                     f["idle_stall_ms"], f["full_gc_ms"], f["old_stall_ms"],
                     f["view_mb"], f["read_kb_per_s"],
                     f"{f['redis_cpu_per_s'] * 100:.1f}%"])

    def by(key: str) -> dict[str, float]:
        return {str(s): per[s][key] for s in sizes}

    first, last = str(sizes[0]), str(sizes[-1])
    route = by("route_us")
    result: dict[str, Any] = {
        "bench": "fleet_scale", "proxies": sizes, "replicas_per_proxy": REPLICAS, "versions": args.versions,
        "max_holders": args.max_holders,
        "route_us": route, "route_old_us": by("route_old_us"),
        "route_ratio": {k: per[int(k)]["route_old_us"] / v for k, v in route.items()},
        "route_growth": route[last] / route[first],
        "route_cold_us": by("route_cold_us"), "route_hot_us": by("route_hot_us"),
        "route_wide_us": by("route_wide_us"), "route_wide_all_us": by("route_wide_all_us"),
        "wide_holders": by("wide_holders"),
        "running_of_us": by("running_of_us"), "running_old_us": by("running_old_us"),
        "beat_us": by("beat_us"), "old_poll_block_ms": by("old_poll_block_ms"),
        "stall_ms": by("stall_ms"), "stall_code_ms": by("stall_code_ms"), "gc_max_ms": by("gc_max_ms"),
        "stall_wall_ms": by("stall_wall_ms"), "first_poll_stall_ms": by("first_poll_stall_ms"),
        "heap_settle_ms": by("heap_settle_ms"),
        "intake_stall_ms": by("intake_stall_ms"), "request_step_ms": by("request_step_ms"),
        "lag_ms": by("lag_ms"), "old_lag_ms": by("old_lag_ms"), "loop": "uvloop" if args.uvloop else "asyncio",
        "load_rps": by("load_rps"), "idle_stall_ms": by("idle_stall_ms"), "idle_stall_wall_ms": by("idle_stall_wall_ms"),
        "idle_lag_ms": by("idle_lag_ms"), "full_gc_ms": by("full_gc_ms"),
        "probe_step_ms": by("probe_step_ms"), "idle_probe_step_ms": by("idle_probe_step_ms"),
        "old_stall_ms": by("old_stall_ms"), "old_stall_wall_ms": by("old_stall_wall_ms"),
        "stall_ratio": {str(s): per[s]["old_stall_ms"] / max(per[s]["stall_ms"], 1e-6) for s in sizes},
        "view_mb": by("view_mb"), "index_mb": by("index_mb"),
        "ingress_read_kb_per_s": by("read_kb_per_s"), "old_ingress_read_kb_per_s": by("old_read_kb_per_s"),
        "ingress_cmds_per_poll": by("ingress_cmds_per_poll"), "redis_cpu_per_s": by("redis_cpu_per_s"),
        "heartbeat_bytes": per[sizes[-1]]["heartbeat_bytes"],
        "redis_kb_per_1000_proxies": per[sizes[-1]]["redis_kb_per_1000_proxies"],
        "redis_keys_per_1000_proxies": per[sizes[-1]]["redis_keys_per_1000_proxies"],
        "pubsub_msgs_per_s_per_ingress_from_fleet": 0, "huge_heap": on_huge_heap(os.environ),
        **versions,
        "goals_met": {"route_5000_le_50": route.get("5000", 0.0) <= 50 if "5000" in route else None,
                      "route_growth_le_3": route[last] / route[first] <= 3,
                      "stall_le_1ms": all(per[s]["stall_ms"] <= 1 for s in sizes),
                      "intake_stall_le_1ms": all(per[s]["intake_stall_ms"] <= 1 for s in sizes),
                      "stall_code_le_1ms": all(per[s]["stall_code_ms"] <= 1 for s in sizes)},
    }
    report(rows, result)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.fleet_scale", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10,100,1000,5000", help="proxies per synthetic fleet")
    parser.add_argument("--versions", type=int, default=100_000)
    parser.add_argument("--max-holders", type=int, default=8, help="replicas of one version at most (capacity.max)")
    parser.add_argument("--seconds", type=float, default=6.0, help="heartbeats arriving, per fleet and poll kind")
    parser.add_argument("--route-s", type=float, default=0.6, help="seconds per timed routing figure")
    parser.add_argument("--deploy-versions", type=int, default=1000, help="versions created to cost them in Redis")
    parser.add_argument("--redis-url", default="", help="a Redis to use (flushed!); default: a throwaway one")
    parser.add_argument("--rps", type=float, default=200.0,
                        help="requests a second the ingress routes while it polls (stall figures; the idle_ ones: 0)")
    parser.add_argument("--no-heap-keeper", action="store_true",
                        help="poll without shared/heap.py's keeper (the collector's passes walk the whole view)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--uvloop", action="store_true",
                        help="run on uvloop, as the daemons do (then only lag_ms sees stalls: uvloop's callbacks "
                             "bypass the per-callback meter)")
    parser.add_argument("--writer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--figures", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.writer:
        writer_main(args.redis_url, int(args.sizes), args.versions, args.max_holders, args.seconds, args.seed)
        return
    if args.figures:
        print(orjson.dumps(in_process_figures(int(args.sizes), args)).decode(), flush=True)
        return
    if args.uvloop:
        run_async(measure(args))
    else:
        asyncio.run(measure(args))


if __name__ == "__main__":
    exec_on_huge_heap()  # the ingress's memory layout (shared/hugeheap.py); LUKEWARM_HUGE_PAGES=0: without
    main()
