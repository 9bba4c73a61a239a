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
        assert set(data[key]) == {"lukewarm", "least_loaded", "random", "consistent_hash", "multiplex"}
    assert data["ratio_vs_least_loaded"] >= 0.0 and data["ratio_vs_random"] >= 0.0
    assert data["best_baseline"] in sim.BASELINES and data["ratio_vs_best_baseline"] >= 0.0


def test_consistent_hashing_keeps_a_model_on_its_host_until_that_host_is_over_its_bound() -> None:
    cfg = sim.Config(hosts=4)
    rng = random.Random(1)
    models = sim.make_models(cfg, rng)
    fleet = sim.new_fleet(cfg, models)
    req = sim.Request(arrival=sim.Arrival(index=0, at_ms=0.0, model=3, infer_ms=1.0))
    home = sim.route_consistent_hash(fleet, req, 0.0, rng)
    assert all(sim.route_consistent_hash(fleet, req, 0.0, rng) == home for _ in range(5))
    # Overload the home host: the bounded-load rule moves the model to the next host on the ring.
    busy = sim.Replica(uid=1, model=3, state="running", last_used=0.0, busy=True)
    busy.queue.extend(req for _ in range(10))
    fleet.hosts[home].replicas[3] = busy
    assert sim.route_consistent_hash(fleet, req, 0.0, rng) != home


def test_multiplexing_prefers_a_host_holding_the_model() -> None:
    cfg = sim.Config(hosts=4)
    rng = random.Random(1)
    fleet = sim.new_fleet(cfg, sim.make_models(cfg, rng))
    fleet.hosts[2].replicas[7] = sim.Replica(uid=1, model=7, state="running", last_used=0.0)
    req = sim.Request(arrival=sim.Arrival(index=0, at_ms=0.0, model=7, infer_ms=1.0))
    assert {sim.route_multiplex(fleet, req, 0.0, rng) for _ in range(10)} == {2}
