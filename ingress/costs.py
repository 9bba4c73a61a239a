"""Measured costs per version: start cost per tier and inference time per item (moving averages).

The router and the splitter read these; every chunk result feeds them.
"""
from __future__ import annotations

import dataclasses

from ingress.router import StartCosts

ALPHA = 0.2  # weight of the newest sample in the moving averages


def _ewma(old: float | None, sample: float) -> float:
    return sample if old is None else old + ALPHA * (sample - old)


def start_tier(start: str, timings: dict[str, float]) -> str:
    """The tier a chunk's start cost belongs to: the proxy reports both a thaw and a stopped replica's boot
    as ``lukewarm``; only a thaw has an ``unpause`` phase."""
    if start == "lukewarm" and "unpause_ms" not in timings:
        return "stopped"
    return start


@dataclasses.dataclass
class _VersionCosts:
    lukewarm_ms: float | None = None
    cold_ms: float | None = None
    per_item_ms: float | None = None
    stopped_ms: float | None = None
    # What ``CostBook.costs`` answers, made once per sample: the router prices a proxy's offer once per
    # heartbeat and costs object (``ProxyState.price``), so the same object must come back until a sample.
    answer: StartCosts | None = None


class CostBook:
    """Moving averages per version key, with fleet-wide defaults until measured."""

    def __init__(self, defaults: StartCosts = StartCosts()) -> None:
        self.defaults = defaults
        self._by_version: dict[str, _VersionCosts] = {}

    def record(self, version: str, tier: str, start_ms: float, infer_ms: float, items: int) -> None:
        """One chunk's answer: ``tier`` as ``start_tier`` names it (cold, lukewarm: a thaw, stopped, warm)."""
        entry = self._by_version.setdefault(version, _VersionCosts())
        entry.answer = None
        if tier == "cold":
            entry.cold_ms = _ewma(entry.cold_ms, start_ms)
        elif tier == "lukewarm":
            entry.lukewarm_ms = _ewma(entry.lukewarm_ms, start_ms)
        elif tier == "stopped":
            entry.stopped_ms = _ewma(entry.stopped_ms, start_ms)
        if items > 0:
            entry.per_item_ms = _ewma(entry.per_item_ms, infer_ms / items)

    def measured(self, version: str) -> bool:
        """Whether inference time of ``version`` has been measured yet (not a default)."""
        entry = self._by_version.get(version)
        return entry is not None and entry.per_item_ms is not None

    def costs(self, version: str) -> StartCosts:
        entry = self._by_version.get(version)
        if entry is None:
            return self.defaults
        if entry.answer is None:
            entry.answer = StartCosts(
                lukewarm_ms=entry.lukewarm_ms if entry.lukewarm_ms is not None else self.defaults.lukewarm_ms,
                cold_ms=entry.cold_ms if entry.cold_ms is not None else self.defaults.cold_ms,
                infer_ms=entry.per_item_ms if entry.per_item_ms is not None else self.defaults.infer_ms,
                stopped_ms=entry.stopped_ms if entry.stopped_ms is not None else self.defaults.stopped_ms,
            )
        return entry.answer
