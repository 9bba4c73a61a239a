"""Metrics.render: Prometheus text format."""
from __future__ import annotations


from shared.metrics import Metrics


def test_empty_render_is_a_newline() -> None:
    assert Metrics().render() == "\n"


def test_counters_labels_and_sums() -> None:
    m = Metrics()
    m.inc("requests", status="200")
    m.inc("requests", status="200")
    m.inc("requests", status="503")
    m.inc("restarts")
    m.observe("request", 0.25, start="warm")
    m.observe("request", 0.5, start="warm")
    lines = m.render().splitlines()
    assert lines == sorted(lines)
    assert 'lukewarm_requests{status="200"} 2' in lines
    assert 'lukewarm_requests{status="503"} 1' in lines
    assert "lukewarm_restarts 1" in lines
    assert 'lukewarm_request_seconds_sum{start="warm"} 0.75' in lines
    assert 'lukewarm_request_seconds_count{start="warm"} 2' in lines


def test_labels_sorted_regardless_of_call_order() -> None:
    m = Metrics()
    m.inc("x", b="2", a="1")
    m.inc("x", a="1", b="2")
    assert m.render() == 'lukewarm_x{a="1",b="2"} 2\n'


def test_large_counter_keeps_precision() -> None:
    m = Metrics()
    m.inc("requests", 1234567, status="200")
    assert m.render() == 'lukewarm_requests{status="200"} 1234567\n'
