"""Predictive keep-warm (``idle_timeout_s: "auto"``): when to pause, stop and pre-warm one version's replicas.

Pure: plain numbers in, frozen dataclasses out; no I/O, no asyncio, no clock (``now`` is passed in).

Anchor: the hybrid histogram policy of "Serverless in the Wild" (Shahrad et al., USENIX ATC 2020). Per
application it keeps a histogram of *idle times* (IT: end of one invocation to the start of the next; 1-min
bins over a 4-hour range) and, once the histogram is representative, unloads the app right after a call,
loads it again at the histogram's head (5th percentile, minus a 10 % margin: the *pre-warm window*) and keeps
it until the tail (99th percentile, plus 10 %: the end of the *keep-alive window*). With too few samples, or a
flat histogram (coefficient of variation of the bin counts under 2), it falls back to a standard fixed
keep-alive; when most ITs fall outside the range (at least half) it forecasts the next IT with ARIMA and
pre-warms around it (margin 15 %). Those constants are the paper's, as a public reproduction of it
(dslab's ``HybridHistogramPolicy``) sets them.

What we keep, what we changed, and why:

- Idle time = from the moment the version has no call in flight on this host (the end of a *busy period*) to
  the start of the next call. Calls that overlap are one busy period: a busy version is not idle, so they
  record nothing. (Arrival-to-arrival gaps would count a 30-s inference as 30 s of "idle" time.)
- Bins are logarithmic, not 1 minute wide: bin 0 is ``[0, base_s)``, then each bin is ``ratio`` (10 %) wider
  than the one before, up to ``range_s`` (1 day, so daily timers are in range; the paper's 4 h left them to
  ARIMA). A paused replica thaws in ~1 ms, so the structure under a minute matters here (a burst's
  seconds-apart calls), and a constant relative width makes the paper's 10 % margin exactly one bin whatever
  the period: a 5-minute timer and a 2-hour one get equally tight windows. 121 bins by default.
- The windows (rule ``"cost"``, the default): the paper's shape, at most two windows per idle period — hold
  ``[0, hold)`` after the call, then unload, then hold again ``[prewarm, keep)`` — but their edges are
  chosen by expected cost on the histogram instead of fixed percentiles. Holding bin ``k`` costs the
  expected memory-seconds spent there (the bin's width times the probability that no call came yet) and
  earns ``start_cost_s`` times the probability that the next call lands in it. The additive per-bin values
  make the best pair of windows (first one starting at the call's end) an O(bins) max-sum search. By default
  ``start_cost_s`` is the fallback idle timeout: a fixed keep-alive ``T`` is the break-even (ski-rental)
  rule for a start priced at ``T`` memory-seconds, so this is the same trade-off as the fixed policy, made
  with the distribution known. The first window is widened by the paper's 10 % (``hist_margin``), the
  pre-warm window is not (``prewarm_margin``): its bins were chosen because calls land there, and a call
  that lands beside them next time adds to a neighbouring bin, which the next decision then weighs.
  Rule ``"percentile"`` is the paper's p5/p99 rule, kept for comparison.
- Representativeness: at least ``min_samples`` idle periods seen; under that, the fixed fallback. The CV test
  gates the paper's rule only: the cost rule weighs a flat histogram correctly by itself (it holds a Poisson
  version with a short mean IT, and not one whose mean IT is far above ``start_cost_s``).
- Out of range: when at least ``oob_threshold`` of the idle times exceed ``range_s``, the second window is a
  forecast: exponential smoothing of log(IT) of the out-of-range idle times (no ARIMA: two floats of state),
  held for ±``forecast_margin`` around it, and only while that smoothed spread is within the margin (an
  irregular out-of-range version gets no second window: holding for it would cost hours of memory for few
  hits). The first window still comes from the histogram.
- Lukewarm tiers: memory is held while a replica runs *or* is paused; a paused replica thaws in ~1 ms, a
  stopped one needs ``docker start`` plus the model's load. So a replica is paused ``pause_after_s`` after
  its call (or at once when its window is shorter), stopped when its first window ends, and pre-warmed
  (a stopped replica started, then paused) ``start_lead_s`` before its second window. A gap between the two
  windows shorter than ``min_unload_s`` is held through: a stop/start cycle costs the host a start.
- Bounded memory whatever a tenant sends: a fixed array of counts (halved when their sum reaches
  ``max_samples``, which also makes the policy forget old behaviour), an out-of-range count and two floats;
  NaN and negative idle times are ignored, huge ones clamp into the out-of-range count. About 0.5 KB of
  counts per version (``array('I')``), ~1 KB with the object and its cached decision.

How a proxy uses it: one ``IdleTracker`` per version on the host, ``started(now)`` when a call takes a
replica and ``finished(now)`` when it gives it back. Each reaper round, for each idle replica (no call in
flight, not ``keep_warm``) of an ``"auto"`` version: ``plan = tracker.plan(fallback_idle_s)`` (None while
another replica of the version is busy: then ``fixed_plan(replica.last_used, fallback_idle_s)``) and do
``plan.action(state, now)``: ``"pause"``, ``"stop"`` (free the memory), or ``"prewarm"`` (start a stopped
replica; the next round pauses it). The plan is anchored on the version's idle start, not on the replica's
``last_used``, so starting a replica for a pre-warm does not move it. ``plan.release_at`` is when memory
stops being wanted for good (the remove timer's start).
"""
from __future__ import annotations

import array
import dataclasses
import math
from typing import Literal

Source = Literal["fallback", "histogram", "forecast"]
Desired = Literal["running", "paused", "stopped"]
Action = Literal["pause", "stop", "prewarm"]


@dataclasses.dataclass(frozen=True)
class Params:
    """The policy's knobs; the defaults are meant for a proxy (seconds throughout)."""

    base_s: float = 1.0  # upper edge of bin 0: idle times under a second are one bin
    ratio: float = 1.1  # each bin 10 % wider than the one before (= the paper's margin)
    range_s: float = 86400.0  # idle times beyond this are out of range (the forecast's input)
    min_samples: int = 10  # idle periods seen before the histogram is trusted
    max_samples: int = 2048  # counts are halved when their sum reaches this: bounded, and old habits fade
    rule: Literal["cost", "percentile"] = "cost"
    start_cost_s: float | None = None  # a start priced in memory-seconds; None: the fallback idle timeout
    hist_margin: float = 0.1  # windows widened by this fraction each side (the paper's 10 %)
    # Rule "cost": the pre-warm window's widening. None: its bins, chosen by what they are worth, already
    # hold the calls seen; the paper's 10 % each side held a 600 s timer 189 s a period instead of 64
    # (loadtests.keepwarm: timer-like apps' memory 0.27 → 0.14× the fixed policy's, their starts 0.078 →
    # 0.080×; all apps: memory 0.70 → 0.65×, starts 0.77 → 0.80×).
    prewarm_margin: float = 0.0
    head_pct: float = 0.05  # rule "percentile": pre-warm at this quantile ...
    tail_pct: float = 0.99  # ... keep until this one
    cv_threshold: float = 2.0  # rule "percentile": a flatter histogram falls back
    oob_threshold: float = 0.5  # this share of idle times out of range: the second window is a forecast
    forecast_margin: float = 0.15  # the forecast window: ±15 % (the paper's ARIMA margin)
    forecast_alpha: float = 0.3  # smoothing weight of the newest out-of-range idle time
    pause_after_s: float = 30.0  # a running replica idle this long is paused (thaw ~1 ms, so soon)
    min_unload_s: float = 30.0  # shorter unloaded gaps are held through: a stop/start cycle is not worth it
    start_lead_s: float = 5.0  # a stopped replica is started this long before its window (boot + load),
    # at least: a caller that knows the version's own start time passes ``start_lead`` of it instead
    max_idle_s: float = 366 * 86400.0  # longer idle times are taken as this (no inf in the forecast)


DEFAULT_PARAMS = Params()


@dataclasses.dataclass(frozen=True)
class Windows:
    """A decision relative to the start of an idle period: hold ``[0, hold_s)``, then, when ``prewarm_s`` is
    set, hold again ``[prewarm_s, keep_s)`` (``prewarm_s >= hold_s``)."""

    source: Source
    hold_s: float
    prewarm_s: float | None = None
    keep_s: float | None = None

    @classmethod
    def of(cls, source: Source, hold_s: float, prewarm_s: float | None = None,
           keep_s: float | None = None) -> Windows:
        """Normalised: ``hold_s >= 0``; a second window only when it ends after it starts, after the first."""
        hold_s = max(0.0, hold_s)
        if prewarm_s is None or keep_s is None or keep_s <= max(prewarm_s, hold_s):
            return cls(source, hold_s)
        return cls(source, hold_s, max(prewarm_s, hold_s), keep_s)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to do with an idle replica, in absolute times (the clock of ``idle_since``).

    Memory is wanted in ``[idle_since, stop_at)`` (running until ``pause_at``, then paused) and, when
    ``prewarm_at`` is set, again in ``[prewarm_at, keep_until)`` (paused); elsewhere the replica is stopped.
    """

    source: Source
    idle_since: float
    pause_at: float
    stop_at: float
    prewarm_at: float | None = None
    keep_until: float | None = None

    @property
    def release_at(self) -> float:
        """When memory stops being wanted for good (for the remove timer: stopped + ``stop_remove_after_s``)."""
        return self.keep_until if self.keep_until is not None else self.stop_at

    def in_prewarm(self, now: float) -> bool:
        return self.prewarm_at is not None and self.keep_until is not None and self.prewarm_at <= now < self.keep_until

    def desired(self, now: float) -> Desired:
        if now < self.stop_at:
            return "running" if now < self.pause_at else "paused"
        return "paused" if self.in_prewarm(now) else "stopped"

    def action(self, state: str, now: float) -> Action | None:
        """The step for a replica in ``state`` (``running``/``paused``/``stopped``; others: None).

        Never thaws ahead of a call (1 ms on demand) and never starts a stopped replica inside the first
        window: one stopped then was evicted for room, and starting it again would undo that.
        """
        want = self.desired(now)
        if state == "running":
            return None if want == "running" else "pause" if want == "paused" else "stop"
        if state == "paused":
            return "stop" if want == "stopped" else None
        if state == "stopped" and self.in_prewarm(now):
            return "prewarm"
        return None


class IdleHistogram:
    """The idle times of one version on one host, in fixed log-spaced bins; bounded memory.

    ``observe`` is O(1). ``windows`` is O(bins) when recomputed, which happens after the sample count grew
    by a sixteenth (or on a halving, or another fallback): a reaper may ask every second for free.
    """

    __slots__ = ("_bins", "_cache", "_cache_at", "_cache_key", "_per_log", "counts", "log_mean", "log_var", "oob",
                 "oob_seen", "params", "rejected", "samples")

    def __init__(self, params: Params = DEFAULT_PARAMS) -> None:
        self.params = params
        self.counts = array.array("I", bytes(4 * bin_count(params)))
        self.oob = 0  # idle times beyond range_s (halved with the counts)
        self.samples = 0  # sum of counts + oob: the (decayed) number of idle periods seen
        self.rejected = 0  # NaN or negative idle times, ignored (saturates)
        self.log_mean: float | None = None  # smoothed log(IT) of out-of-range idle times
        self.log_var = 0.0
        self.oob_seen = 0  # out-of-range idle times smoothed in (saturates)
        self._cache: Windows | None = None
        self._cache_at = -1
        self._cache_key: tuple[float, float] = (math.nan, math.nan)
        self._bins = len(self.counts)
        self._per_log = 1.0 / math.log(params.ratio)

    def observe(self, idle_s: float) -> None:
        """Record one idle period of ``idle_s`` seconds."""
        if not idle_s >= 0.0:  # NaN too
            self.rejected = min(self.rejected + 1, 1 << 30)
            return
        p = self.params
        idle_s = min(idle_s, p.max_idle_s)
        # bin_index, inlined: the proxy calls this once per call
        k = 0 if idle_s < p.base_s else 1 + int(math.log(idle_s / p.base_s) * self._per_log)
        if k < self._bins and idle_s < p.range_s:
            self.counts[k] += 1
        else:
            self.oob += 1
            self._smooth(math.log(max(idle_s, p.base_s)))
        self.samples += 1
        if self.samples >= p.max_samples:
            self._halve()

    def _smooth(self, x: float) -> None:
        a = self.params.forecast_alpha
        if self.log_mean is None:
            self.log_mean, self.log_var = x, 0.0
        else:
            d = x - self.log_mean
            self.log_mean += a * d
            self.log_var = (1 - a) * (self.log_var + a * d * d)
        self.oob_seen = min(self.oob_seen + 1, 1 << 30)

    def _halve(self) -> None:
        for k, c in enumerate(self.counts):
            self.counts[k] = c // 2
        self.oob //= 2
        self.samples = sum(self.counts) + self.oob
        self._cache = None

    def windows(self, fallback_idle_s: float, start_lead_s: float | None = None) -> Windows:
        """The decision for an idle period that starts now, relative to its start (cached).

        ``start_lead_s``: how long a stopped replica of this version takes to be ready (None: the
        params'); a pre-warm starts that much before its window."""
        lead = self.params.start_lead_s if start_lead_s is None else max(0.0, start_lead_s)
        key = (fallback_idle_s, lead)
        stale = (self._cache is None or key != self._cache_key
                 or self.samples - self._cache_at >= max(1, self._cache_at // 16) or self.samples < self._cache_at)
        if stale:
            self._cache, self._cache_at, self._cache_key = self._decide(fallback_idle_s, lead), self.samples, key
        assert self._cache is not None
        return self._cache

    def _decide(self, fallback_idle_s: float, lead_s: float) -> Windows:
        p = self.params
        if self.samples < p.min_samples:
            return Windows.of("fallback", max(0.0, fallback_idle_s))
        cost = p.start_cost_s if p.start_cost_s is not None else fallback_idle_s
        if self.oob >= p.oob_threshold * self.samples:
            # Mostly out of range: the paper forecasts and unloads right after the call; the cost rule keeps
            # its first window (and its second one when the forecast is too irregular to aim at).
            first = Windows.of("forecast", 0.0) if p.rule == "percentile" else cost_windows(self, cost, lead_s)
            forecast = self._forecast_window(first.hold_s, lead_s, regular_only=p.rule == "cost")
            return forecast or first
        if p.rule == "percentile":
            return percentile_windows(self, fallback_idle_s, lead_s)
        return cost_windows(self, cost, lead_s)

    def _forecast_window(self, hold_s: float, lead_s: float, regular_only: bool) -> Windows | None:
        """Hold ``[0, hold_s)``, then ±``forecast_margin`` around the forecast; None before any out-of-range
        idle time, or (``regular_only``) while the smoothed spread is wider than the margin."""
        p = self.params
        if self.log_mean is None:
            return None
        if regular_only and (self.oob_seen < 3 or math.sqrt(self.log_var) > p.forecast_margin):
            return None
        expected = math.exp(self.log_mean)
        prewarm = max(hold_s, expected * (1 - p.forecast_margin) - lead_s)
        return Windows.of("forecast", hold_s, prewarm, expected * (1 + p.forecast_margin))

    def forecast_s(self) -> float | None:
        """The next out-of-range idle time as smoothed so far (None before any)."""
        return None if self.log_mean is None else math.exp(self.log_mean)

    def cv(self) -> float:
        """Coefficient of variation of the in-range bin counts (the paper's representativeness test)."""
        n = len(self.counts)
        total = sum(self.counts)
        if total == 0 or n < 2:
            return 0.0
        mean = total / n
        var = sum((c - mean) ** 2 for c in self.counts) / (n - 1)
        return math.sqrt(var) / mean


# ---- bins ----------------------------------------------------------------------


def bin_count(p: Params) -> int:
    return 1 + math.ceil(math.log(p.range_s / p.base_s) / math.log(p.ratio))


def bin_index(idle_s: float, p: Params) -> int:
    """0 for ``[0, base_s)``; then ``1 + floor(log_ratio(idle / base))``; ``>= bin_count`` is out of range
    (``range_s`` and beyond)."""
    if idle_s < p.base_s:
        return 0
    if idle_s >= p.range_s:
        return bin_count(p)
    return min(bin_count(p) - 1, 1 + int(math.log(idle_s / p.base_s) / math.log(p.ratio)))


def bin_edges(p: Params) -> list[float]:
    """The ``bin_count + 1`` edges: 0, base, base·ratio, …, the last one clipped to ``range_s``."""
    n = bin_count(p)
    return [0.0] + [min(p.base_s * p.ratio ** k, p.range_s) for k in range(n - 1)] + [p.range_s]


_EDGES: dict[Params, list[float]] = {}


def _edges(p: Params) -> list[float]:
    edges = _EDGES.get(p)
    if edges is None:
        edges = _EDGES[p] = bin_edges(p)
    return edges


# ---- the two rules ---------------------------------------------------------------


def cost_windows(h: IdleHistogram, start_cost_s: float, lead_s: float) -> Windows:
    """The best hold-then-maybe-again pair of windows by expected cost (see the module's docstring).

    Value of holding bin k: ``start_cost_s · P(next call in k) − E[memory-seconds spent in k]``, with the
    out-of-range mass counted in the survival (a call that never comes in range still costs the wait).
    """
    p = h.params
    edges = _edges(p)
    n = len(h.counts)
    total = float(h.samples)
    values, waiting = [0.0] * n, h.samples  # idle periods still waiting at bin k's start: exact, in counts
    for k, c in enumerate(h.counts):
        after = waiting - c
        values[k] = (start_cost_s * c - (edges[k + 1] - edges[k]) * (waiting + after) / 2) / total
        waiting = after
    # best[i]: the best sum of a window [a, b) with a >= i (0 for none), and where it lies.
    best = [0.0] * (n + 1)
    span: list[tuple[int, int]] = [(n, n)] * (n + 1)
    run, run_end = 0.0, n  # best window starting exactly at i: v_i + max(0, best one starting at i+1)
    for i in range(n - 1, -1, -1):
        if run > 0.0:
            run += values[i]
        else:
            run, run_end = values[i], i + 1
        if run > best[i + 1]:
            best[i], span[i] = run, (i, run_end)
        else:
            best[i], span[i] = best[i + 1], span[i + 1]
    # the first window [0, b1) and the best second one after it
    b1, top, prefix = 0, best[0], 0.0
    for b in range(1, n + 1):
        prefix += values[b - 1]
        if prefix + best[b] > top:
            b1, top = b, prefix + best[b]
    a2, b2 = span[b1]
    m = p.hist_margin
    hold = edges[b1] * (1 + m) if b1 > 0 else 0.0
    if a2 >= n:
        return Windows.of("histogram", hold)
    prewarm = edges[a2] * (1 - p.prewarm_margin) - lead_s
    keep = edges[b2] * (1 + p.prewarm_margin)
    if prewarm - hold < p.min_unload_s:
        # Too short to stop and start again: hold through to the second window's end, or drop that window.
        through = sum(values[:b2])
        return Windows.of("histogram", edges[b2] * (1 + m)) if through >= sum(values[:b1]) \
            else Windows.of("histogram", hold)
    return Windows.of("histogram", hold, prewarm, keep)


def percentile_windows(h: IdleHistogram, fallback_idle_s: float, lead_s: float) -> Windows:
    """The paper's rule: representative histogram → pre-warm at the head, keep until the tail; else fall back."""
    p = h.params
    if h.cv() < p.cv_threshold or sum(h.counts) == 0:
        return Windows.of("fallback", max(0.0, fallback_idle_s))
    edges = _edges(p)
    in_range = sum(h.counts)
    head = tail = -1
    cumulative = 0
    for k, c in enumerate(h.counts):
        cumulative += c
        if head < 0 and cumulative >= p.head_pct * in_range:
            head = k
        if cumulative >= p.tail_pct * in_range:
            tail = k
            break
    m = p.hist_margin
    keep = edges[tail + 1] * (1 + m)
    prewarm = edges[head] * (1 - m) - lead_s
    if prewarm < p.min_unload_s:
        return Windows.of("histogram", keep)
    return Windows.of("histogram", 0.0, prewarm, keep)


# ---- for the reaper ----------------------------------------------------------------


def plan(hist: IdleHistogram, idle_since: float, fallback_idle_s: float, start_lead_s: float | None = None) -> Plan:
    """The plan of an idle period that began at ``idle_since`` (the version's last call ended then)."""
    return plan_from(hist.windows(fallback_idle_s, start_lead_s), idle_since, hist.params)


def plan_from(w: Windows, idle_since: float, params: Params = DEFAULT_PARAMS) -> Plan:
    """``w`` (normalised by ``Windows.of``) in absolute times from ``idle_since``."""
    hold = w.hold_s
    pause = min(hold, params.pause_after_s)
    if w.prewarm_s is None or w.keep_s is None:
        return Plan(w.source, idle_since, idle_since + pause, idle_since + hold)
    return Plan(w.source, idle_since, idle_since + pause, idle_since + hold, idle_since + w.prewarm_s,
                idle_since + w.keep_s)


# A pre-warm starts this many times the version's measured start before its window: starts vary.
LEAD_PER_START = 1.5


def start_lead(start_ms: float | None, params: Params = DEFAULT_PARAMS) -> float:
    """How long before its window a stopped replica of a version whose starts here take ``start_ms`` (a
    moving average; None before one was timed) is started: ``params.start_lead_s``, or more for a slow
    model, which must be up when the call comes (a 30 s load pre-warmed 5 s ahead is a start after all)."""
    if start_ms is None:
        return params.start_lead_s
    return max(params.start_lead_s, LEAD_PER_START * start_ms / 1000.0)


def fixed_plan(last_used: float, idle_timeout_s: float, params: Params = DEFAULT_PARAMS) -> Plan:
    """The fallback alone: hold ``idle_timeout_s`` after ``last_used`` (paused after ``pause_after_s``)."""
    return plan_from(Windows.of("fallback", idle_timeout_s), last_used, params)


class IdleTracker:
    """One version's calls on one host → its idle periods. Call ``started``/``finished`` around each call."""

    __slots__ = ("histogram", "idle_since", "in_flight", "last_call")

    def __init__(self, params: Params = DEFAULT_PARAMS) -> None:
        self.histogram = IdleHistogram(params)
        self.in_flight = 0
        self.idle_since: float | None = None  # end of the last busy period; None while busy or before any call
        self.last_call = 0.0  # when a call last started or ended (which versions a host may forget first)

    def started(self, now: float) -> None:
        if self.in_flight == 0 and self.idle_since is not None:
            self.histogram.observe(now - self.idle_since)
        self.in_flight += 1
        self.idle_since = None
        self.last_call = now

    def finished(self, now: float) -> None:
        self.last_call = now
        self.in_flight = max(0, self.in_flight - 1)
        if self.in_flight == 0:
            self.idle_since = now

    def plan(self, fallback_idle_s: float, start_lead_s: float | None = None) -> Plan | None:
        """The plan of the current idle period; None while a call is in flight (or before the first one)."""
        if self.idle_since is None:
            return None
        return plan(self.histogram, self.idle_since, fallback_idle_s, start_lead_s)
