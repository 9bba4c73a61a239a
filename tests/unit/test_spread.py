"""Where a chunk goes when the best proxy for its version is full: tested from tables."""
from __future__ import annotations

import pytest

from ingress.router import Choice, ProxyState, ReplicaState
from ingress.spread import spread

V = "acme/m/main/1"


def proxy(pid: str, *replicas: tuple[str, int]) -> ProxyState:
    return ProxyState(proxy_id=pid, url=f"http://{pid}", epoch=1, ts=0.0,
                      replicas=tuple(ReplicaState(V, state, in_flight, 1) for state, in_flight in replicas))


def choice(p: ProxyState, tier: str, ms: float) -> Choice:
    return Choice(proxy=p, tier=tier, expected_ms=ms)


A_FREE = choice(proxy("a", ("running", 0)), "warm", 0)
A_BUSY = choice(proxy("a", ("running", 1)), "warm", 400)
B_COLD = choice(proxy("b"), "cold", 400)
C_PAUSED = choice(proxy("c", ("paused", 0)), "lukewarm", 25)


@pytest.mark.parametrize(
    ("choices", "sent", "may_start", "first"),
    [
        ([A_FREE, B_COLD], {}, True, "a"),               # room on the best: stay
        ([A_BUSY, B_COLD], {}, True, "b"),               # full: the next replica goes elsewhere
        ([A_BUSY, B_COLD], {}, False, "a"),              # at capacity.max: wait for a slot instead
        ([A_BUSY, B_COLD, C_PAUSED], {}, True, "c"),     # fewest replicas, lukewarm before cold
        ([A_FREE, B_COLD], {"a": 1}, True, "b"),         # our own in-flight call fills a (heartbeat is stale)
        ([A_BUSY, B_COLD], {"b": 1}, True, "a"),         # b already got one from us: no better than a
        ([], {}, True, None),
    ],
)
def test_spread(choices: list[Choice], sent: dict[str, int], may_start: bool, first: str | None) -> None:
    out = spread(choices, V, sent, may_start)
    assert sorted(c.proxy.proxy_id for c in out) == sorted(c.proxy.proxy_id for c in choices)
    assert (out[0].proxy.proxy_id if out else None) == first
