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
        ([A_FREE, B_COLD], {"a": 1}, True, "a"),         # our call fills a, but waiting for it beats a cold start
        ([A_BUSY, B_COLD], {"b": 1}, True, "a"),         # b already got one from us: no better than a
        ([], {}, True, None),
    ],
)
def test_spread(choices: list[Choice], sent: dict[str, int], may_start: bool, first: str | None) -> None:
    out = spread(choices, V, sent, may_start)
    assert sorted(c.proxy.proxy_id for c in out) == sorted(c.proxy.proxy_id for c in choices)
    assert (out[0].proxy.proxy_id if out else None) == first


def test_our_own_queue_at_the_best_sends_the_next_one_elsewhere_once_it_outlasts_a_start() -> None:
    # The heartbeat shows a idle; we have 5 requests there: 5 * 100 ms queued > b's 400 ms cold start.
    out = spread([A_FREE, B_COLD], V, {"a": 5}, True, infer_ms=100.0)
    assert out[0].proxy.proxy_id == "b"
    assert spread([A_FREE, B_COLD], V, {"a": 3}, True, infer_ms=100.0)[0].proxy.proxy_id == "a"  # 300 < 400


def test_a_busy_warm_replica_beats_a_cold_host() -> None:
    """The thrash issue 13 found: a 20 ms queue must not become a 340 ms cold start on another host."""
    a = choice(proxy("a", ("running", 1)), "warm", 20)
    assert spread([a, B_COLD], V, {}, True, infer_ms=20.0)[0].proxy.proxy_id == "a"


@pytest.mark.parametrize("seed", range(200))
def test_spread_never_worsens_the_expected_latency(seed: int) -> None:
    import random

    from ingress.spread import expected_with_sent

    rng = random.Random(seed)
    states = ("running", "paused", "stopped", "starting")
    choices = []
    for pid in "abcde":
        replicas = [(rng.choice(states), rng.randint(0, 1)) for _ in range(rng.randint(0, 3))]
        tier = rng.choice(["warm", "lukewarm", "cold"])
        choices.append(choice(proxy(pid, *replicas), tier, rng.choice([0.0, 5.0, 25.0, 200.0, 400.0, 800.0])))
    choices.sort(key=lambda c: c.expected_ms)
    sent = {pid: rng.randint(0, 6) for pid in "abcde" if rng.random() < 0.5}
    infer_ms = rng.choice([0.0, 5.0, 50.0, 200.0])
    out = spread(choices, V, sent, rng.random() < 0.8, infer_ms)
    assert sorted(c.proxy.proxy_id for c in out) == sorted(c.proxy.proxy_id for c in choices)
    assert out[0].expected_ms <= expected_with_sent(choices[0], V, sent, infer_ms)
