"""CostBook: measured start and inference costs per version, defaults until measured."""
from __future__ import annotations

import pytest

from ingress.costs import ALPHA, CostBook, start_tier
from ingress.router import StartCosts

V = "acme/churn/main/1"
DEFAULTS = StartCosts(lukewarm_ms=25.0, cold_ms=400.0, infer_ms=5.0)


def test_unknown_version_gets_defaults() -> None:
    book = CostBook(DEFAULTS)
    assert book.costs(V) == DEFAULTS
    assert CostBook().costs(V) == StartCosts()


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        # only what was measured changes; the rest stays at the defaults
        ([("cold", 1000.0, 30.0, 3)], StartCosts(lukewarm_ms=25.0, cold_ms=1000.0, infer_ms=10.0)),
        ([("lukewarm", 8.0, 4.0, 2)], StartCosts(lukewarm_ms=8.0, cold_ms=400.0, infer_ms=2.0)),
        ([("warm", 999.0, 6.0, 1)], StartCosts(lukewarm_ms=25.0, cold_ms=400.0, infer_ms=6.0)),
        ([("warm", 0.0, 6.0, 0)], DEFAULTS),  # no items: no per-item sample
        # the first sample is taken as is, later ones move the average by ALPHA
        ([("cold", 1000.0, 10.0, 1), ("cold", 2000.0, 20.0, 1)],
         StartCosts(lukewarm_ms=25.0, cold_ms=1000.0 + ALPHA * 1000.0, infer_ms=10.0 + ALPHA * 10.0)),
        ([("lukewarm", 10.0, 1.0, 1), ("cold", 500.0, 1.0, 1), ("lukewarm", 20.0, 1.0, 1)],
         StartCosts(lukewarm_ms=10.0 + ALPHA * 10.0, cold_ms=500.0, infer_ms=1.0)),
        # a stopped replica's boot is its own average: it never drags a thaw's up
        ([("lukewarm", 2.0, 1.0, 1), ("stopped", 600.0, 1.0, 1)],
         StartCosts(lukewarm_ms=2.0, cold_ms=400.0, infer_ms=1.0, stopped_ms=600.0)),
    ],
)
def test_record_then_costs(records: list[tuple[str, float, float, int]], expected: StartCosts) -> None:
    book = CostBook(DEFAULTS)
    for start, start_ms, infer_ms, items in records:
        book.record(V, start, start_ms, infer_ms, items)
    got = book.costs(V)
    assert got.lukewarm_ms == pytest.approx(expected.lukewarm_ms)
    assert got.cold_ms == pytest.approx(expected.cold_ms)
    assert got.infer_ms == pytest.approx(expected.infer_ms)
    assert got.stopped_ms == pytest.approx(expected.stopped_ms)


@pytest.mark.parametrize(("start", "timings", "tier"), [
    ("lukewarm", {"unpause_ms": 0.2, "infer_ms": 1.0}, "lukewarm"),  # a thaw
    ("lukewarm", {"start_ms": 250.0, "ready_ms": 80.0}, "stopped"),  # a stopped replica booted
    ("cold", {"create_ms": 20.0, "start_ms": 250.0}, "cold"),
    ("warm", {}, "warm"),
])
def test_start_tier_tells_a_thaw_from_a_boot(start: str, timings: dict[str, float], tier: str) -> None:
    assert start_tier(start, timings) == tier


def test_ewma_moves_toward_samples_and_converges() -> None:
    book = CostBook(DEFAULTS)
    book.record(V, "cold", 100.0, 1.0, 1)
    previous = book.costs(V).cold_ms
    for _ in range(60):
        book.record(V, "cold", 500.0, 1.0, 1)
        now = book.costs(V).cold_ms
        assert previous < now <= 500.0
        previous = now
    assert previous == pytest.approx(500.0, rel=1e-3)


def test_per_item_cost_divides_by_items() -> None:
    book = CostBook(DEFAULTS)
    book.record(V, "warm", 0.0, 100.0, 50)
    assert book.costs(V).infer_ms == pytest.approx(2.0)


def test_versions_are_kept_apart() -> None:
    book = CostBook(DEFAULTS)
    book.record(V, "cold", 1234.0, 1.0, 1)
    assert book.costs("acme/churn/main/2") == DEFAULTS
    assert book.costs(V).cold_ms == 1234.0


def test_the_same_costs_object_comes_back_until_a_sample_moves_it() -> None:
    """The router keeps a proxy's price per heartbeat and costs object: a fresh object per call would make
    every request price every candidate again, and a kept one after a sample would route on old costs."""
    book = CostBook(DEFAULTS)
    book.record(V, "warm", 0.0, 10.0, 1)
    first = book.costs(V)
    assert book.costs(V) is first
    book.record(V, "cold", 900.0, 10.0, 1)
    moved = book.costs(V)
    assert moved is not first and moved.cold_ms == 900.0 and book.costs(V) is moved
