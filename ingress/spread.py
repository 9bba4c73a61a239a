"""Where a version's next replica goes when its best proxy is full: spread over hosts, not piled on one.

A pure function of the ranked choices, the heartbeats in them, and what this
ingress itself has in flight (fresher than any heartbeat during a burst).

It never trades latency for spreading: a request goes to another proxy only when
that proxy's expected latency is no worse than the best one's, counted with this
ingress's own requests there that the heartbeat does not show yet. A request that
would wait a few inference times for a busy warm replica waits for it rather than
pay a cold start elsewhere; the capacity a lasting load needs is added in the
background, by the proxy (``runtime_proxy.replica.start_pays``: when its queue
would outlast a start) and by the capacity loop (``ingress.autoscale``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ingress.router import Choice, ProxyState


def _mine(proxy: ProxyState, version: str) -> list:  # type: ignore[type-arg]
    # From the per-version tuples the heartbeat already grouped (ProxyState.by_version), not a pass over
    # every replica of the host: spread runs on every request.
    return [r for r in proxy.by_version.get(version, ()) if r.state != "dead"]


def _slots(proxy: ProxyState, version: str) -> int:
    return sum(r.concurrency for r in _mine(proxy, version) if r.state == "running")


def _seen(proxy: ProxyState, version: str) -> int:
    """Requests of ``version`` the heartbeat shows there: slots taken and requests waiting for one."""
    return sum(r.in_flight for r in _mine(proxy, version)) + proxy.waiting_for(version)


def _load(proxy: ProxyState, version: str, sent: Mapping[str, int]) -> int:
    return max(_seen(proxy, version), sent.get(proxy.proxy_id, 0))


def _replicas(proxy: ProxyState, version: str, sent: Mapping[str, int]) -> int:
    """Running (or starting) replicas of ``version`` there, counting the ones our own requests are starting;
    a paused one does not count: resuming it is the cheapest way to add one."""
    mine = _mine(proxy, version)
    concurrency = max((r.concurrency for r in mine), default=1)
    running = sum(1 for r in mine if r.state in ("running", "starting"))
    return max(running, math.ceil(sent.get(proxy.proxy_id, 0) / max(1, concurrency)))


def expected_with_sent(choice: Choice, version: str, sent: Mapping[str, int], infer_ms: float) -> float:
    """``choice``'s expected latency with this ingress's requests there that its heartbeat does not show yet
    queued in front (each an inference time over the running slots)."""
    slots = _slots(choice.proxy, version)
    unseen = max(0, sent.get(choice.proxy.proxy_id, 0) - _seen(choice.proxy, version))
    return choice.expected_ms + (unseen / slots * infer_ms if slots else 0.0)


def spread(choices: Sequence[Choice], version: str, sent: Mapping[str, int], may_start: bool,
           infer_ms: float = 0.0) -> list[Choice]:
    """``choices`` with, first, the proxy that should take a chunk the best one has no room for.

    Unchanged when the best proxy has a free slot, or when no new replica may start. Otherwise the
    chunk goes to the proxy holding the fewest replicas of the version (lukewarm ones first) among
    those whose expected latency is no worse than the best's (``expected_with_sent``, ``infer_ms`` the
    version's measured time per request), so that a version under load runs on several hosts without
    any request paying a start it could have been spared. The first choice's expected latency is never
    worse than the best's.
    """
    ranked = list(choices)
    if not ranked or not may_start:
        return ranked
    best = ranked[0]
    if _load(best.proxy, version, sent) < _slots(best.proxy, version):
        return ranked
    bound = expected_with_sent(best, version, sent, infer_ms)
    rank = {"warm": 0, "lukewarm": 1, "cold": 2}
    eligible = [c for c in ranked if c is best or c.expected_ms <= bound]
    target = min(eligible, key=lambda c: (_replicas(c.proxy, version, sent), rank.get(c.tier, 3), c.expected_ms))
    if _replicas(target.proxy, version, sent) >= _replicas(best.proxy, version, sent):
        return ranked
    return [target] + [c for c in ranked if c is not target]
