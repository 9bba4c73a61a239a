"""The routing simulator (loadtests.sim): deterministic per seed, sane metrics, nothing lost."""
from __future__ import annotations

import math
import random

import orjson
import pytest

from loadtests import sim

SMALL = sim.Config(models=20, hosts=3, max_replicas=4, cores=2, idle_timeout_ms=300.0)
N = 1500


@pytest.fixture(scope="module")
def results() -> dict[str, sim.Result]:
    return sim.run_all(SMALL, seed=7, n=N)


def test_same_seed_same_results(results: dict[str, sim.Result]) -> None:
    assert sim.run_all(SMALL, seed=7, n=N) == results


def test_other_seed_other_trace() -> None:
    models = sim.make_models(SMALL, random.Random(1))
    a = sim.make_trace(SMALL, models, 50, random.Random(1))
    b = sim.make_trace(SMALL, models, 50, random.Random(2))
    assert a != b


@pytest.mark.parametrize("policy", sim.POLICIES)
def test_metrics_are_sane(results: dict[str, sim.Result], policy: str) -> None:
    r = results[policy]
    assert r.total == N and r.total_completed == N  # every request answered
    assert r.requests == N - int(N * SMALL.warmup) and r.completed == r.requests
    for fraction in (r.start_fraction, r.cold_fraction, r.lukewarm_fraction, r.utilisation):
        assert 0.0 <= fraction <= 1.0
    assert math.isclose(r.start_fraction, r.cold_fraction + r.lukewarm_fraction)
    assert 0.0 < r.p50_ms <= r.p99_ms
    assert r.counters.created >= r.counters.evicted
    assert r.start_fraction > 0.0  # a small fleet with a short idle timeout does start replicas


def test_cli_prints_json_last(capsys: pytest.CaptureFixture[str]) -> None:
    sim.main(["--seed", "3", "--requests", "1000", "--models", "20", "--hosts", "3", "--max-replicas", "4"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    data = orjson.loads(last)
    assert data["bench"] == "sim" and data["seed"] == 3 and data["requests"] == 1000
    for key in ("start_fraction", "p50_ms", "p99_ms"):
        assert set(data[key]) == {"lukewarm", "least_loaded", "random"}
    assert data["ratio_vs_least_loaded"] >= 0.0 and data["ratio_vs_random"] >= 0.0
