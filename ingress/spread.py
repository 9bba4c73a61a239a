"""Where a version's next replica goes when its best proxy is full: spread over hosts, not piled on one.

A pure function of the ranked choices, the heartbeats in them, and what this
ingress itself has in flight (fresher than any heartbeat during a burst).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ingress.router import Choice, ProxyState


def _mine(proxy: ProxyState, version: str) -> list:  # type: ignore[type-arg]
    return [r for r in proxy.replicas if r.version == version and r.state != "dead"]


def _slots(proxy: ProxyState, version: str) -> int:
    return sum(r.concurrency for r in _mine(proxy, version) if r.state == "running")


def _load(proxy: ProxyState, version: str, sent: Mapping[str, int]) -> int:
    return max(sum(r.in_flight for r in _mine(proxy, version)), sent.get(proxy.proxy_id, 0))


def _replicas(proxy: ProxyState, version: str, sent: Mapping[str, int]) -> int:
    """Running (or starting) replicas of ``version`` there, counting the ones our own requests are starting;
    a paused one does not count: resuming it is the cheapest way to add one."""
    mine = _mine(proxy, version)
    concurrency = max((r.concurrency for r in mine), default=1)
    running = sum(1 for r in mine if r.state in ("running", "starting"))
    return max(running, math.ceil(sent.get(proxy.proxy_id, 0) / max(1, concurrency)))


def spread(choices: Sequence[Choice], version: str, sent: Mapping[str, int], may_start: bool) -> list[Choice]:
    """``choices`` with, first, the proxy that should take a chunk the best one has no room for.

    Unchanged when the best proxy has a free slot, or when no new replica may start. Otherwise a
    new replica is coming anyway: it goes to the proxy holding the fewest replicas of the version
    (lukewarm ones first), so that a version under load runs on several hosts.
    """
    ranked = list(choices)
    if not ranked or not may_start:
        return ranked
    best = ranked[0].proxy
    if _load(best, version, sent) < _slots(best, version):
        return ranked
    rank = {"warm": 0, "lukewarm": 1, "cold": 2}
    target = min(ranked, key=lambda c: (_replicas(c.proxy, version, sent), rank.get(c.tier, 3), c.expected_ms))
    if _replicas(target.proxy, version, sent) >= _replicas(best, version, sent):
        return ranked
    return [target] + [c for c in ranked if c is not target]
