"""How many replicas a version should have: a pure function of (stats, capacity, settings, now, state).

Like Ray Serve's replica-queue-length policy, the target is in-flight requests
per replica (``max_concurrency``), bounded by ``capacity.min``/``capacity.max``,
quick to go up and slow to come down. Where it differs:

- Delays are measured in time (``now`` is passed in), not in control-loop
  periods, so an irregular loop neither speeds nor slows a decision.
- Smoothing is the maximum over the downscale window: the target falls only
  once *every* sample in the last ``downscale_delay_s`` asked for fewer.
  Going up uses the latest sample alone (a burst is served now, not averaged away).
- The warmth tiers decide *how* to grow: paused or stopped replicas (lukewarm,
  ~20 ms to wake) are used first, always at once; a replica that must start
  cold is added only when it pays for itself by the version's measured cold
  start: the overload has already lasted that long (``cold_start_patience``
  cold starts), or the queue in front of the running replicas would take
  longer than a cold start to drain. A burst shorter than a cold start is
  left to the replicas there are.
- The floor (``capacity.min`` ready, warm or lukewarm) is kept whatever the
  load: missing ready replicas are started at once.

Nothing here removes replicas: the proxies' idle policy pauses, stops and
removes idle ones. A falling target only means the loop stops adding, and
stops waking what that policy paused.
"""
from __future__ import annotations

import dataclasses
import math

from ingress.router import StartCosts
from shared.messages import Capacity


@dataclasses.dataclass(frozen=True)
class VersionStats:
    """One version across the fleet, from the proxies' heartbeats."""

    demand: int  # requests in flight on its replicas plus those waiting at proxies for one
    running: int  # running or starting replicas: serving now, or about to
    lukewarm: int = 0  # paused or stopped replicas: ready for the floor, one wake away from serving
    costs: StartCosts = dataclasses.field(default_factory=StartCosts)


@dataclasses.dataclass(frozen=True)
class AutoscaleSettings:
    max_concurrency: float = 1.0  # the target: requests in flight per replica
    downscale_delay_s: float = 30.0
    downscale_to_zero_delay_s: float = 300.0
    cold_start_patience: float = 1.0


@dataclasses.dataclass(frozen=True)
class AutoscaleState:
    """What one decision hands the next (start from ``AutoscaleState()``)."""

    samples: tuple[tuple[float, int], ...] = ()  # (time, demand) within the downscale window, oldest first
    target: int = 0  # the load's replica count decided last time, before the floor and the ceiling
    last_busy: float | None = None  # when demand was last above 0
    short_since: float | None = None  # since when running + lukewarm replicas have not sufficed for the demand


@dataclasses.dataclass(frozen=True)
class ScaleDecision:
    replicas: int  # desired replicas of the version, within [capacity.min, capacity.max]
    wake: int = 0  # paused or stopped replicas to bring back now
    cold: int = 0  # new replicas to start now
    reason: str = "steady"  # floor | wake | cold | wait_cold | steady (for logs and tests)


def desired_replicas(
    stats: VersionStats, capacity: Capacity, settings: AutoscaleSettings, now: float, state: AutoscaleState,
) -> tuple[ScaleDecision, AutoscaleState]:
    """The replicas ``stats``'s version should have now, what to add to get there, and the next state."""
    per_replica = max(settings.max_concurrency, 1e-9)
    samples = _window(state.samples, now, settings.downscale_delay_s) + ((now, stats.demand),)
    last_busy = now if stats.demand > 0 else state.last_busy
    target = _load_target(stats.demand, samples, per_replica, state.target)
    if target == 0 and state.target > 0 and last_busy is not None \
            and now - last_busy < settings.downscale_to_zero_delay_s:
        target = 1  # to zero only after a whole idle delay without a single request
    bounded = min(target, capacity.max)
    wake, cold, reason, short_since = _additions(stats, capacity, bounded, per_replica, settings, now,
                                                 state.short_since)
    new_state = AutoscaleState(samples=samples, target=target, last_busy=last_busy, short_since=short_since)
    return ScaleDecision(max(capacity.min, bounded), wake, cold, reason), new_state


def _additions(
    stats: VersionStats, capacity: Capacity, bounded: int, per_replica: float, settings: AutoscaleSettings,
    now: float, short_since: float | None,
) -> tuple[int, int, str, float | None]:
    """(replicas to wake, replicas to start cold, why, since when lukewarm ones have not sufficed)."""
    floor = max(0, capacity.min - stats.running - stats.lukewarm)
    # Load wakes only while there is load: with no request in flight, what the idle policy paused
    # stays paused even while the target is still coming down. Waking is cheap: up to the target.
    short = max(0, bounded - stats.running) if stats.demand > 0 else 0
    wake = min(short, stats.lukewarm)
    # A cold start is not: only for what the present demand needs beyond what runs and wakes, and
    # the overload's clock runs only while that is so.
    need_now = min(math.ceil(stats.demand / per_replica), capacity.max)
    missing = max(0, need_now - stats.running - wake)
    if missing == 0:
        short_since = None
    elif short_since is None:
        short_since = now
    pays = short_since is not None and _cold_pays(stats, wake, per_replica, now - short_since,
                                                  settings.cold_start_patience)
    load_cold = missing if pays else 0
    # At most capacity.max running: whatever is woken or started runs. (The floor always fits:
    # min <= max and lukewarm replicas count as ready, so it needs at most max - running.)
    room = max(0, capacity.max - stats.running)
    wake = min(wake, room)
    cold = min(max(load_cold, floor), room - wake)
    return wake, cold, _reason(wake, cold, floor, load_cold, missing), short_since


def _reason(wake: int, cold: int, floor: int, load_cold: int, missing: int) -> str:
    if cold:
        return "cold" if load_cold > floor else "floor"
    if wake:
        return "wake"
    return "wait_cold" if missing else "steady"


def _window(samples: tuple[tuple[float, int], ...], now: float, window_s: float) -> tuple[tuple[float, int], ...]:
    return tuple(s for s in samples if now - s[0] < window_s)


def _load_target(demand: int, samples: tuple[tuple[float, int], ...], per_replica: float, previous: int) -> int:
    """Up at once to what the latest demand needs; down only to what the busiest sample of the window needs."""
    now_need = math.ceil(demand / per_replica)
    if now_need >= previous:
        return now_need
    window_need = math.ceil(max(d for _, d in samples) / per_replica)
    return max(now_need, min(previous, window_need))


def _cold_pays(stats: VersionStats, wake: int, per_replica: float, short_for_s: float, patience: float) -> bool:
    """Whether starting a replica cold helps more than waiting for the ones there are."""
    serving = stats.running + wake
    if serving == 0:
        return True  # nothing else can answer: every request would wait for a start anyway
    cold_ms = stats.costs.cold_ms
    if short_for_s * 1000 >= cold_ms * patience:
        return True  # the overload has outlasted a cold start already: it is not a blip
    # The queue beyond the serving replicas' slots, drained at the measured time per request.
    excess = stats.demand - serving * per_replica
    drain_ms = excess / (serving * per_replica) * stats.costs.infer_ms
    return drain_ms >= cold_ms
