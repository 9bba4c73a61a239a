"""Predictive keep-warm against a fixed idle timeout, on a synthetic Azure-Functions-like trace.

Pure Python, no Redis, Docker or network; seeded and deterministic. One trace of many apps (one model
version each) is replayed, per app, against the life of one replica under:

- ``fixed``: memory held for ``--fixed-s`` (600: AWS Lambda's 10 minutes) after each call, then the replica
  is stopped; generous to it: no reaper delay;
- ``predictive``: ``runtime_proxy.keepwarm`` (rule "cost", the default) driving the same replica, its
  histogram fed each idle period as the proxy's tracker would, its fallback the same ``--fixed-s``;
  actions land ``--reaper-s`` after their planned time and a pre-warmed (stopped) replica is ready
  ``--start-s`` after that;
- ``paper``: the same with the paper's p5/p99 rule (``Params(rule="percentile")``), for comparison.

A *start* is a call that finds no running or paused replica (the first call of each app included, for
every policy); ``start_fraction`` = starts / calls. ``memory_s`` = seconds a replica is running or paused
(busy time included, the same for every policy); ``wasted`` = memory_s minus the busy time.

The trace follows the published statistics of "Serverless in the Wild" (Shahrad et al., ATC 2020): daily
invocations per app heavy-tailed over orders of magnitude, ~45 % of apps invoked at most once an hour on
average and ~81 % at most once a minute; inter-arrival regularity widely spread: timer-like apps
(near-periodic, CV ≈ 0, on common timer periods), Poisson apps (CV ≈ 1) and bursty ones (ON/OFF, CV > 1);
execution times mostly under a second, heavy-tailed. The most popular apps are capped at ``--max-per-day``
so that a run takes seconds (they are warm under every policy anyway).

    python -m loadtests.keepwarm [--seed 1] [--apps 400] [--days 7] [--fixed-s 600] [--max-per-day 3000]
"""
from __future__ import annotations

import argparse
import bisect
import dataclasses
import math
import random
import time
from collections.abc import Sequence
from typing import Any

from runtime_proxy import keepwarm

CLASSES = ("periodic", "poisson", "bursty")
CLASS_SHARES = (0.25, 0.40, 0.35)
DAY_S = 86400.0
# Common timer periods (s): 1, 2, 5, 10, 15, 30 min, 1, 2, 3, 6, 12, 24 h.
TIMER_PERIODS_S = (60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
# CDF of log10(invocations per day) per app, piecewise linear: ~8 % at most daily, 45 % at most hourly,
# 81 % at most once a minute (Shahrad et al., Fig. 5a, read approximately); the top capped by --max-per-day.
RATE_CDF = ((-0.5, 0.0), (0.0, 0.08), (math.log10(24), 0.45), (math.log10(1440), 0.81), (5.0, 1.0))


@dataclasses.dataclass(frozen=True)
class Config:
    apps: int = 400
    days: float = 7.0
    fixed_s: float = 600.0
    reaper_s: float = 1.0  # the proxy's reaper round: actions land up to this late
    start_s: float = 2.0  # a stopped replica's start (docker start + model load) for a pre-warm
    max_per_day: float = 3000.0


@dataclasses.dataclass(frozen=True)
class App:
    name: str
    cls: str
    per_day: float  # target mean invocations per day
    starts: tuple[float, ...]  # call start times (s), sorted
    durations: tuple[float, ...]  # execution times (s)


@dataclasses.dataclass
class Tally:
    calls: int = 0
    starts: int = 0
    memory_s: float = 0.0
    busy_s: float = 0.0

    def add(self, other: Tally) -> None:
        self.calls += other.calls
        self.starts += other.starts
        self.memory_s += other.memory_s
        self.busy_s += other.busy_s

    @property
    def start_fraction(self) -> float:
        return self.starts / self.calls if self.calls else math.nan

    @property
    def wasted_s(self) -> float:
        return self.memory_s - self.busy_s


# ---- the trace -------------------------------------------------------------------


def sample_per_day(rng: random.Random, cap: float) -> float:
    u = rng.random()
    xs, ps = [x for x, _ in RATE_CDF], [p for _, p in RATE_CDF]
    i = min(max(bisect.bisect_right(ps, u), 1), len(ps) - 1)
    x = xs[i - 1] + (xs[i] - xs[i - 1]) * (u - ps[i - 1]) / (ps[i] - ps[i - 1])
    return min(10 ** x, cap)


def arrivals(cls: str, per_day: float, horizon_s: float, rng: random.Random) -> list[float]:
    mean_gap = DAY_S / per_day
    out: list[float] = []
    if cls == "periodic":
        # A timer on a common period; the call reaches the proxy a little late (queues, cron skew).
        period = min(TIMER_PERIODS_S, key=lambda p: abs(math.log(p / mean_gap)))
        t = rng.uniform(0, period)
        while t < horizon_s:
            out.append(t + abs(rng.gauss(0.0, 0.5 + 0.002 * period)))
            t += period
        return sorted(out)
    if cls == "poisson":
        t = rng.expovariate(1 / mean_gap)
        while t < horizon_s:
            out.append(t)
            t += rng.expovariate(1 / mean_gap)
        return out
    # bursty: bursts of calls seconds apart, bursts apart by lognormal gaps (σ 1.2): CV well above 1
    size = 1 + rng.expovariate(1 / rng.uniform(2, 20))  # mean calls per burst
    within = rng.uniform(1, 30)  # mean gap inside a burst (s)
    between = max(mean_gap * size - size * within, 10 * within)  # mean gap between bursts
    sigma = 1.2
    t = rng.uniform(0, between)
    while t < horizon_s:
        for _ in range(1 + int(rng.expovariate(1 / size))):
            out.append(t)
            t += rng.expovariate(1 / within)
        t += rng.lognormvariate(math.log(between) - sigma ** 2 / 2, sigma)
    return [a for a in out if a < horizon_s]


def make_trace(cfg: Config, seed: int) -> list[App]:
    rng = random.Random(seed)
    horizon = cfg.days * DAY_S
    apps = []
    for i in range(cfg.apps):
        cls = rng.choices(CLASSES, weights=CLASS_SHARES)[0]
        per_day = sample_per_day(rng, cfg.max_per_day)
        starts = arrivals(cls, per_day, horizon, rng)
        median = min(60.0, math.exp(rng.gauss(math.log(0.3), 1.2)))  # per-app execution time
        durations = tuple(min(300.0, median * rng.lognormvariate(0.0, 0.5)) for _ in starts)
        apps.append(App(f"app{i:04d}", cls, per_day, tuple(starts), durations))
    return apps


def busy_periods(app: App) -> list[tuple[float, float, int]]:
    """(start, end, calls) of each stretch with a call in flight (overlapping calls are one)."""
    out: list[tuple[float, float, int]] = []
    for s, d in zip(app.starts, app.durations):
        if out and s <= out[-1][1]:
            a, e, n = out[-1]
            out[-1] = (a, max(e, s + d), n + 1)
        else:
            out.append((s, s + d, 1))
    return out


# ---- the policies ----------------------------------------------------------------


def run_fixed(app: App, cfg: Config, horizon: float) -> Tally:
    t = Tally(calls=len(app.starts))
    periods = busy_periods(app)
    for i, (s, e, _) in enumerate(periods):
        t.busy_s += e - s
        gap = (periods[i + 1][0] if i + 1 < len(periods) else max(horizon, e)) - e
        t.memory_s += min(gap, cfg.fixed_s)
        if i + 1 < len(periods) and gap >= cfg.fixed_s:
            t.starts += 1
    t.starts += 1 if periods else 0  # the first call: nothing there yet
    t.memory_s += t.busy_s
    return t


def run_predictive(app: App, cfg: Config, horizon: float, params: keepwarm.Params,
                   sources: dict[str, int]) -> Tally:
    """One replica driven by the real ``keepwarm.plan``, its histogram fed each idle period as the proxy's
    ``IdleTracker`` would (busy periods: overlapping calls record no idle time)."""
    t = Tally(calls=len(app.starts))
    hist = keepwarm.IdleHistogram(params)
    periods = busy_periods(app)
    lag = cfg.reaper_s
    for i, (s, e, _) in enumerate(periods):
        t.busy_s += e - s
        last = i + 1 == len(periods)
        arrival = max(horizon, e) if last else periods[i + 1][0]
        plan = keepwarm.plan(hist, e, cfg.fixed_s)
        sources[plan.source] = sources.get(plan.source, 0) + 1
        stop = plan.stop_at + lag  # held (running, then paused) until the reaper's round after stop_at
        t.memory_s += min(arrival, stop) - e
        warm = arrival < stop
        if plan.prewarm_at is not None and plan.keep_until is not None:
            # pre-warm: the reaper's round after prewarm_at starts the stopped replica; ready start_s later
            on, off = plan.prewarm_at + lag, plan.keep_until + lag
            t.memory_s += max(0.0, min(arrival, off) - on)
            warm = warm or on + cfg.start_s <= arrival < off
        if not last:
            t.starts += 0 if warm else 1
            hist.observe(arrival - e)
    t.starts += 1 if periods else 0
    t.memory_s += t.busy_s
    return t


POLICIES = ("fixed", "predictive", "paper")


# ---- what any policy could reach on this trace ------------------------------------------


def _window_frontier(gaps: Sequence[float], tail: float) -> list[tuple[float, int]]:
    """The (memory, starts) of every fixed window worth choosing over ``gaps`` (sorted idle times, ``tail``
    the last one's, cut by the horizon), with the gaps known: hindsight. Windows end just past a gap (or
    are 0); of those, the lower convex hull: what minimises memory + mu × starts for some mu."""
    n = len(gaps)
    points = [(0.0, n)]  # window 0: nothing held, every gap a start
    covered = 0.0  # the sum of the gaps under the window
    for k, g in enumerate(gaps):
        covered += g
        points.append((covered + g * (n - k - 1) + min(tail, g), n - k - 1))
    hull: list[tuple[float, int]] = []
    for m, st in points:  # starts fall and memory rises along the list
        while len(hull) >= 2:
            (m1, s1), (m2, s2) = hull[-2], hull[-1]
            # the middle point is above the chord from hull[-2] to this one: never the best
            if (m2 - m1) * (s1 - st) >= (m - m1) * (s1 - s2):
                hull.pop()
            else:
                break
        hull.append((m, st))
    return hull


def hindsight_bound(apps: Sequence[App], cfg: Config, starts_budget: int) -> dict[str, float]:
    """A floor under any keep-warm policy's memory on this trace at ``starts_budget`` starts.

    Periodic apps are granted their busy time alone, with no start but their first call (no policy does
    better). Poisson and bursty apps get, each, the fixed window that a Lagrangian multiplier picks with
    their idle times known in hindsight, the multiplier set so that all starts fit the budget. For a
    Poisson app this is a floor for every policy that does not see the future: its arrivals are
    memoryless, so a second of memory held buys the same chance of a warm call whenever it is held, and
    a window (or none) is the best use of it. Bursty apps' idle times fall off in likelihood after a
    burst (seconds-apart calls, then lognormal gaps), which also favours one window from the call's end;
    the predictive policy given each app's whole week of idle times up front lands on the same frontier
    (``python -m loadtests.keepwarm``'s note in README). Returns the memory-seconds and the starts."""
    horizon = cfg.days * DAY_S
    floor_s, first_calls = 0.0, 0
    rest: list[list[tuple[float, int]]] = []
    for app in apps:
        periods = busy_periods(app)
        if not periods:
            continue
        busy = sum(e - s for s, e, _ in periods)
        floor_s += busy
        first_calls += 1  # every app's first call
        if app.cls != "periodic":
            gaps = sorted(periods[i + 1][0] - periods[i][1] for i in range(len(periods) - 1))
            rest.append(_window_frontier(gaps, max(horizon, periods[-1][1]) - periods[-1][1]))

    def at(mu: float) -> tuple[float, int]:
        memory, starts = 0.0, 0
        for hull in rest:
            m, n = min(hull, key=lambda point: point[0] + mu * point[1])
            memory, starts = memory + m, starts + n
        return memory, starts

    lo, hi = 1e-3, horizon  # starts fall as mu rises; at mu = horizon every gap is held
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if at(mid)[1] + first_calls <= starts_budget else (mid, hi)
    memory, starts = at(hi)
    return {"memory_s": floor_s + memory, "starts": starts + first_calls, "multiplier_s": hi}


def run_all(cfg: Config, seed: int) -> tuple[dict[str, Tally], dict[str, dict[str, Tally]], dict[str, dict[str, int]],
                                               list[App]]:
    apps = make_trace(cfg, seed)
    horizon = cfg.days * DAY_S
    totals = {p: Tally() for p in POLICIES}
    by_class = {c: {p: Tally() for p in POLICIES} for c in CLASSES}
    sources: dict[str, dict[str, int]] = {"predictive": {}, "paper": {}}
    params = {"predictive": keepwarm.Params(), "paper": keepwarm.Params(rule="percentile")}
    for app in apps:
        results = {"fixed": run_fixed(app, cfg, horizon)}
        for name in ("predictive", "paper"):
            results[name] = run_predictive(app, cfg, horizon, params[name], sources[name])
        for p, tally in results.items():
            totals[p].add(tally)
            by_class[app.cls][p].add(tally)
    return totals, by_class, sources, apps


# ---- output ------------------------------------------------------------------------


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def result_json(cfg: Config, seed: int, totals: dict[str, Tally], by_class: dict[str, dict[str, Tally]],
                sources: dict[str, dict[str, int]], apps: Sequence[App], elapsed_s: float) -> dict[str, Any]:
    f, p, paper = totals["fixed"], totals["predictive"], totals["paper"]
    bound = hindsight_bound(apps, cfg, f.starts)
    memory_ratio = ratio(p.memory_s, f.memory_s)
    start_ratio = ratio(p.start_fraction, f.start_fraction)
    return {
        "bench": "keepwarm",
        "start_fraction": {"fixed": f.start_fraction, "predictive": p.start_fraction},
        "memory_s": {"fixed": f.memory_s, "predictive": p.memory_s},
        "memory_ratio": memory_ratio,
        "start_ratio": start_ratio,
        "targets_met": bool(p.start_fraction <= f.start_fraction and memory_ratio <= 0.5),
        "wasted_memory_s": {"fixed": f.wasted_s, "predictive": p.wasted_s},
        "starts": {"fixed": f.starts, "predictive": p.starts},
        "paper_rule": {"start_fraction": paper.start_fraction, "memory_s": paper.memory_s,
                       "memory_ratio": ratio(paper.memory_s, f.memory_s),
                       "start_ratio": ratio(paper.start_fraction, f.start_fraction)},
        "per_class": {c: {"apps": sum(1 for a in apps if a.cls == c), "calls": by_class[c]["fixed"].calls,
                          "start_fraction": {k: by_class[c][k].start_fraction for k in POLICIES},
                          "memory_s": {k: by_class[c][k].memory_s for k in POLICIES}} for c in CLASSES},
        "plan_sources": sources,
        # The least memory any policy not seeing the future could hold at the fixed policy's starts (hindsight_bound).
        "floor": {"memory_ratio": ratio(bound["memory_s"], f.memory_s), "starts": bound["starts"],
                  "multiplier_s": bound["multiplier_s"]},
        "apps": len(apps), "calls": f.calls, "seed": seed, "days": cfg.days, "fixed_idle_s": cfg.fixed_s,
        "reaper_s": cfg.reaper_s, "start_s": cfg.start_s, "max_per_day": cfg.max_per_day,
        "infrequent_apps": sum(1 for a in apps if a.per_day <= 24) / max(1, len(apps)),
        "elapsed_s": elapsed_s,
    }


def table(totals: dict[str, Tally], by_class: dict[str, dict[str, Tally]], apps: Sequence[App]) -> list[list[Any]]:
    f = totals["fixed"]
    rows: list[list[Any]] = [["policy / class", "apps", "calls", "starts", "start frac", "memory h", "wasted h",
                              "memory / fixed", "starts / fixed"]]

    def row(label: str, n_apps: int, t: Tally, base: Tally) -> list[Any]:
        return [label, n_apps, t.calls, t.starts, t.start_fraction, t.memory_s / 3600, t.wasted_s / 3600,
                ratio(t.memory_s, base.memory_s), ratio(t.starts, base.starts)]

    for p in POLICIES:
        rows.append(row(p, len(apps), totals[p], f))
    for c in CLASSES:
        n_apps = sum(1 for a in apps if a.cls == c)
        for p in POLICIES:
            rows.append(row(f"  {c} / {p}", n_apps, by_class[c][p], by_class[c]["fixed"]))
    return rows


def report(rows: list[list[Any]], result: dict[str, Any]) -> None:
    from loadtests.common import report as common_report

    common_report(rows, result)


def main(argv: list[str] | None = None) -> None:
    d = Config()
    parser = argparse.ArgumentParser(prog="python -m loadtests.keepwarm", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--apps", type=int, default=d.apps)
    parser.add_argument("--days", type=float, default=d.days)
    parser.add_argument("--fixed-s", type=float, default=d.fixed_s, help="fixed idle timeout, also the fallback")
    parser.add_argument("--reaper-s", type=float, default=d.reaper_s)
    parser.add_argument("--start-s", type=float, default=d.start_s)
    parser.add_argument("--max-per-day", type=float, default=d.max_per_day)
    args = parser.parse_args(argv)
    cfg = Config(apps=args.apps, days=args.days, fixed_s=args.fixed_s, reaper_s=args.reaper_s,
                 start_s=args.start_s, max_per_day=args.max_per_day)
    t0 = time.monotonic()
    totals, by_class, sources, apps = run_all(cfg, args.seed)
    elapsed = time.monotonic() - t0
    result = result_json(cfg, args.seed, totals, by_class, sources, apps, elapsed)
    print(f"keepwarm: seed {args.seed}, {len(apps)} apps over {cfg.days:g} days, {totals['fixed'].calls} calls "
          f"({result['infrequent_apps']:.0%} of apps at most hourly); fixed idle {cfg.fixed_s:g} s, reaper "
          f"{cfg.reaper_s:g} s, pre-warm start {cfg.start_s:g} s; {elapsed:.1f} s")
    print(f"predictive / fixed: memory {result['memory_ratio']:.3f}, start fraction {result['start_ratio']:.3f}; "
          f"targets (start fraction <= fixed, memory <= 0.5x): {'met' if result['targets_met'] else 'NOT met'}")
    print(f"floor at the fixed policy's starts (hindsight windows for Poisson and bursty apps, periodic ones at "
          f"busy time only): memory {result['floor']['memory_ratio']:.3f}x fixed")
    report(table(totals, by_class, apps), result)


if __name__ == "__main__":
    main()
