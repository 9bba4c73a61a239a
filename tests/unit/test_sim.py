"""The routing simulator (loadtests.sim): trace shapes, the proxy's own lifecycle rules, sane metrics, the JSON."""
from __future__ import annotations

import collections
import dataclasses
import math
import random
import statistics

import orjson
import pytest

from loadtests import sim

SMALL = sim.Config(models=10, hosts=3, max_replicas=8, cores=2, memory_budget_mb=8192, utilisation=0.4)
N = 800


@pytest.fixture(scope="module")
def runs() -> dict[str, dict[str, sim.Result]]:
    return {shape: sim.run_all(SMALL, seed=7, n=N, shape=shape) for shape in sim.TRACES}


def _models(cfg: sim.Config = sim.Config()) -> list[sim.Model]:
    return sim.make_models(cfg, random.Random(1))


def _cv(times: list[float]) -> float:
    gaps = [b - a for a, b in zip(times, times[1:])]
    return statistics.pstdev(gaps) / statistics.mean(gaps)


def _per_model_cv(trace: list[sim.Arrival], skip_top: int = 5) -> float:
    """Mean inter-arrival CV of the models past the top few that have enough arrivals to judge."""
    by_model: dict[int, list[float]] = collections.defaultdict(list)
    for a in trace:
        by_model[a.model].append(a.at_ms)
    cvs = [_cv(ts) for m, ts in by_model.items() if m >= skip_top and len(ts) >= 30]
    return statistics.mean(cvs)


# ---- traces ------------------------------------------------------------------


@pytest.mark.parametrize("shape", sim.TRACES)
def test_traces_are_ordered_and_whole(shape: str) -> None:
    cfg = sim.Config()
    trace = sim.make_trace(cfg, _models(cfg), 5000, random.Random(2), shape)
    assert len(trace) == 5000
    assert all(a.at_ms <= b.at_ms for a, b in zip(trace, trace[1:]))
    assert {a.model for a in trace} <= set(range(cfg.models)) and all(a.infer_ms > 0 for a in trace)


def test_other_seed_other_trace() -> None:
    models = _models(SMALL)
    assert sim.make_trace(SMALL, models, 50, random.Random(1)) != sim.make_trace(SMALL, models, 50, random.Random(2))


def test_zipf_is_poisson() -> None:
    cfg = sim.Config()
    trace = sim.make_trace(cfg, _models(cfg), 20000, random.Random(3), "zipf")
    assert 0.95 < _cv([a.at_ms for a in trace]) < 1.05
    assert 0.8 < _per_model_cv(trace) < 1.2
    rate = len(trace) / trace[-1].at_ms
    assert math.isclose(rate, sim.arrival_rate_per_ms(cfg, _models(cfg)), rel_tol=0.05)


def test_bursty_comes_in_bursts_at_the_same_mean_rate() -> None:
    cfg = sim.Config()
    models = _models(cfg)
    trace = sim.make_trace(cfg, models, 20000, random.Random(3), "bursty")
    assert _cv([a.at_ms for a in trace]) > 1.0
    assert _per_model_cv(trace) > 1.5  # a tail model: silences between bursts
    assert math.isclose(len(trace) / trace[-1].at_ms, sim.arrival_rate_per_ms(cfg, models), rel_tol=0.1)


def test_burst_rates_keep_the_mean_and_cap_a_popular_models_burst() -> None:
    cfg = sim.Config()
    on_share = cfg.burst_on_ms / (cfg.burst_on_ms + cfg.burst_off_ms)
    for rate, mean_ms in ((0.001, 20.0), (0.2, 20.0)):
        on, off = sim.burst_rates(cfg, rate, mean_ms)
        assert math.isclose(on_share * on + (1 - on_share) * off, rate)
        assert (on - rate) * mean_ms <= cfg.burst_cap_cores + 1e-9
    assert sim.burst_rates(cfg, 0.001, 20.0)[1] == 0.0  # a tail model is silent between bursts


def test_diurnal_rate_rises_from_the_trough_to_the_peak_and_back() -> None:
    cfg = sim.Config()
    models = _models(cfg)
    trace = sim.make_trace(cfg, models, 20000, random.Random(3), "diurnal")
    day = sim.diurnal_day_ms(cfg, models, 20000)
    bins = collections.Counter(int(8 * a.at_ms / day) for a in trace if a.at_ms < day)
    counts = [bins[i] for i in range(8)]
    assert counts.index(max(counts)) in (3, 4) and counts.index(min(counts)) in (0, 7)
    assert 3.0 < max(counts) / min(counts) < 5.0  # the configured 4, blurred by the bins
    peak = sim.rate_per_ms(cfg, models, cfg.diurnal_peak_utilisation)
    assert math.isclose(sim.diurnal_rate(day / 2, day, peak, 4.0) / sim.diurnal_rate(0.0, day, peak, 4.0), 4.0)


# ---- the proxy's rules ---------------------------------------------------------


def _fleet(cfg: sim.Config = SMALL) -> sim.Fleet:
    return sim.new_fleet(cfg, _models(cfg))


def _put(fleet: sim.Fleet, host: sim.Host, model: int, state: str, last_used: float,
         in_flight: int = 0, memory_mb: int = 512) -> sim.Replica:
    fleet.next_uid += 1
    replica = sim.Replica(uid=str(fleet.next_uid), model=model, memory_mb=memory_mb, state=state,
                          last_used=last_used, in_flight=in_flight)
    sim.add_replica(fleet, host, replica)
    return replica


def test_reaper_evicts_paused_before_an_older_idle_running_replica_and_never_a_running_one() -> None:
    fleet = _fleet(dataclasses.replace(SMALL, max_replicas=2))
    host = fleet.hosts[0]
    running = _put(fleet, host, 0, sim.RUNNING, last_used=100.0)
    paused = _put(fleet, host, 1, sim.PAUSED, last_used=150.0)
    _put(fleet, host, 2, sim.PAUSED, last_used=160.0)
    sim.reap(fleet, host, now=200.0)  # over max_replicas by one; nothing idle past its timeout
    assert running.uid in host.replicas and paused.uid not in host.replicas and len(host.replicas) == 2
    _put(fleet, host, 3, sim.RUNNING, last_used=170.0)
    sim.reap(fleet, host, now=200.0)  # over again, with only the paused one and running ones idle
    assert running.uid in host.replicas and len(host.replicas) == 2
    _put(fleet, host, 4, sim.RUNNING, last_used=180.0)
    sim.reap(fleet, host, now=200.0)  # over with only running replicas: the reaper leaves them
    assert len(host.replicas) == 3 and all(e.state != sim.RUNNING for e in fleet.evictions)


def test_a_cold_start_may_evict_an_idle_running_replica_but_not_one_with_waiters() -> None:
    fleet = _fleet(dataclasses.replace(SMALL, max_replicas=2))
    host = fleet.hosts[0]
    waited = _put(fleet, host, 0, sim.RUNNING, last_used=100.0)
    host.pool(0).waiters.append(sim.Request(arrival=sim.Arrival(0, 0.0, 0, 1.0)))
    busy = _put(fleet, host, 1, sim.RUNNING, last_used=110.0, in_flight=1)
    assert not sim.make_room(fleet, host, fleet.models[2])  # both busy: the start fails
    assert waited.uid in host.replicas and busy.uid in host.replicas and not fleet.evictions
    host.pool(0).waiters.clear()
    assert sim.make_room(fleet, host, fleet.models[2])
    assert waited.uid not in host.replicas and [e.reason for e in fleet.evictions] == ["room"]


def test_a_start_refused_for_room_waits_for_a_call_to_end_before_its_waiters_are_refused() -> None:
    fleet = _fleet(dataclasses.replace(SMALL, max_replicas=1))
    host = fleet.hosts[0]
    busy = _put(fleet, host, 1, sim.RUNNING, last_used=5.0, in_flight=1)
    sim.admit(fleet, host, sim.Request(arrival=sim.Arrival(0, 10.0, 0, 1.0)), now=10.0)
    assert host.room_waits == {0: 10.0 + sim.ROOM_WAIT_MS} and fleet.counters.refused == 0
    busy.in_flight = 0  # its call ended
    sim.room_freed(fleet, host, now=20.0)
    assert fleet.counters.cold_starts == 1 and busy.uid not in host.replicas and not host.room_waits
    sim.on_room_wait_over(fleet, (host, 0, 10.0 + sim.ROOM_WAIT_MS), now=10.0 + sim.ROOM_WAIT_MS)
    assert fleet.counters.refused == 0  # that wait was over already: nothing refused at its old end

    fleet = _fleet(dataclasses.replace(SMALL, max_replicas=1))
    host = fleet.hosts[0]
    _put(fleet, host, 1, sim.RUNNING, last_used=5.0, in_flight=1)
    sim.admit(fleet, host, sim.Request(arrival=sim.Arrival(0, 10.0, 0, 1.0)), now=10.0)
    sim.on_room_wait_over(fleet, (host, 0, 10.0 + sim.ROOM_WAIT_MS), now=10.0 + sim.ROOM_WAIT_MS)
    assert fleet.counters.refused == 1 and not host.pool(0).waiters and fleet.counters.cold_starts == 0


def test_make_room_takes_stopped_then_paused_before_running() -> None:
    fleet = _fleet(dataclasses.replace(SMALL, max_replicas=3))
    host = fleet.hosts[0]
    running = _put(fleet, host, 0, sim.RUNNING, last_used=10.0)
    paused = _put(fleet, host, 1, sim.PAUSED, last_used=50.0)
    stopped = _put(fleet, host, 2, sim.STOPPED_STATE, last_used=90.0)
    assert sim.make_room(fleet, host, fleet.models[3])
    assert stopped.uid not in host.replicas and paused.uid in host.replicas and running.uid in host.replicas


def test_idle_replicas_pause_then_stop_then_go_on_the_proxys_timers() -> None:
    cfg = SMALL
    fleet = _fleet(cfg)
    host = fleet.hosts[0]
    replica = _put(fleet, host, 0, sim.RUNNING, last_used=0.0)
    sim.reap(fleet, host, now=cfg.idle_ms - 1)
    assert replica.state == sim.RUNNING
    sim.reap(fleet, host, now=cfg.idle_ms)
    assert replica.state == sim.PAUSED
    sim.reap(fleet, host, now=cfg.idle_ms + cfg.stop_ms)
    assert replica.state == sim.STOPPED_STATE
    sim.reap(fleet, host, now=cfg.idle_ms + cfg.stop_ms + cfg.remove_ms)
    assert replica.uid not in host.replicas and fleet.counters.removed == 1


def test_a_request_thaws_a_paused_replica_before_booting_a_stopped_one_or_starting_cold() -> None:
    fleet = _fleet()
    host = fleet.hosts[0]
    _put(fleet, host, 0, sim.STOPPED_STATE, last_used=5.0)
    paused = _put(fleet, host, 0, sim.PAUSED, last_used=1.0)
    req = sim.Request(arrival=sim.Arrival(0, 10.0, 0, 1.0))
    sim.admit(fleet, host, req, now=10.0)
    assert paused.state == sim.RESUMING and req.tier == sim.THAW and fleet.counters.cold_starts == 0
    other = sim.Request(arrival=sim.Arrival(1, 11.0, 0, 1.0), may_start=False)
    sim.admit(fleet, host, other, now=11.0)  # the stopped one boots (no room made for it)
    assert fleet.counters.stopped_boots == 1 and fleet.counters.cold_starts == 0 and not fleet.evictions


@pytest.mark.parametrize("policy", sim.POLICIES)
def test_no_busy_replica_is_ever_evicted_and_running_ones_only_for_a_start(policy: str) -> None:
    tight = dataclasses.replace(SMALL, max_replicas=4, memory_budget_mb=1536)
    rng = random.Random(5)
    models = sim.make_models(tight, rng)
    trace = sim.make_trace(tight, models, 1200, rng, "bursty")
    fleet = sim.new_fleet(tight, models)
    sim.simulate(tight, models, trace, policy, 5, fleet)
    assert fleet.evictions  # the small fleet does have to make room
    for e in fleet.evictions:
        assert e.in_flight == 0 and e.waiting == 0 and e.state not in (sim.STARTING, sim.RESUMING)
        assert e.state != sim.RUNNING or e.reason == "room"


# ---- runs and metrics ------------------------------------------------------------


def test_same_seed_same_results(runs: dict[str, dict[str, sim.Result]]) -> None:
    assert sim.run_all(SMALL, seed=7, n=N, shape="bursty") == runs["bursty"]


@pytest.mark.parametrize("shape", sim.TRACES)
@pytest.mark.parametrize("policy", sim.POLICIES)
def test_metrics_are_sane(runs: dict[str, dict[str, sim.Result]], shape: str, policy: str) -> None:
    r = runs[shape][policy]
    assert r.total == N and r.total_answered == N  # every request answered (or given up on, counted)
    assert r.requests == N - int(N * SMALL.warmup) and r.completed + r.failed == r.requests
    for fraction in (r.start_fraction, r.cold_fraction, r.stopped_fraction, r.thaw_fraction, r.utilisation):
        assert 0.0 <= fraction <= 1.0
    assert math.isclose(r.start_fraction, r.cold_fraction + r.stopped_fraction)
    assert r.starts == r.cold + r.stopped and r.starts <= r.counters.cold_starts + r.counters.stopped_boots
    assert 0.0 < r.p50_ms <= r.p99_ms and len(r.latencies) == r.completed
    assert r.counters.cold_starts > 0  # a small fleet with tight budgets does start replicas (waited for or not)


def test_a_warm_up_in_simulated_ms_leaves_out_the_requests_that_arrived_before_it() -> None:
    cfg = dataclasses.replace(SMALL, warmup_ms=2000.0)
    rng = random.Random("7:zipf")  # run_all's
    trace = sim.make_trace(cfg, sim.make_models(cfg, rng), N, rng, "zipf")
    expected = sum(a.at_ms >= 2000.0 for a in trace)
    assert 0 < expected < N - int(N * SMALL.warmup)  # not what the default 10 % would keep
    result = sim.run_all(cfg, seed=7, n=N, shape="zipf")["lukewarm"]
    assert result.requests == expected


def test_utilisation_is_the_offered_load_over_the_measured_window_not_diluted_by_the_tail() -> None:
    # Long starts and a short trace (4 s of arrivals): the first starts and the tail after the last
    # arrival are much of the run, and busy time over the whole run read far below the offered load.
    cfg = dataclasses.replace(SMALL, utilisation=0.5, cold_ms=2000.0, stopped_ms=1900.0, warmup_ms=1000.0)
    for policy, result in sim.run_all(cfg, seed=7, n=600, shape="zipf").items():
        assert max(result.latencies) > 2000.0  # the tail: a start's worth past some arrivals
        assert 0.4 <= result.utilisation <= 0.6, (policy, result.utilisation)


def test_figures_pick_the_baseline_with_fewest_starts() -> None:
    sf = {"lukewarm": 0.01, "least_loaded": 0.3, "random": 0.3, "consistent_hash": 0.1, "multiplex": 0.04}
    p99 = {"lukewarm": 300.0, "least_loaded": 900.0, "random": 900.0, "consistent_hash": 800.0, "multiplex": 400.0}
    fig = sim.figures(sf, p99)
    assert fig["best_baseline"] == "multiplex" and math.isclose(fig["start_ratio_vs_best_baseline"], 0.25)
    assert math.isclose(fig["p99_ratio_vs_best_baseline_start"], 0.75) and fig["meets_target"]
    assert not sim.figures({**sf, "lukewarm": 0.03}, p99)["meets_target"]  # 0.75x the starts: not half
    assert not sim.figures(sf, {**p99, "lukewarm": 401.0})["meets_target"]


def test_cli_prints_the_pinned_keys_as_its_last_line(capsys: pytest.CaptureFixture[str]) -> None:
    sim.main(["--seed", "3", "--requests", "400", "--models", "20", "--hosts", "3", "--max-replicas", "6",
              "--cores", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    data = orjson.loads(lines[-1])
    everyone = {"lukewarm", "least_loaded", "random", "consistent_hash", "multiplex"}
    assert data["bench"] == "sim" and data["seed"] == 3 and data["requests"] == 400
    assert set(data["start_fraction"]) == everyone and set(data["p99_ms"]) == everyone
    assert set(data["traces"]) == set(sim.TRACES)
    for trace in data["traces"].values():
        assert set(trace["start_fraction"]) == everyone and set(trace["p99_ms"]) == everyone
        assert trace["best_baseline"] in sim.BASELINES and trace["ratio"] == trace["start_ratio_vs_best_baseline"]
        assert "p99_ratio_vs_best_baseline_start" in trace and isinstance(trace["meets_target"], bool)
    assert data["start_ratio_vs_best_baseline"] == max(t["start_ratio_vs_best_baseline"] for t in data["traces"].values())
    assert isinstance(data["meets_target"], bool) and "p99_ratio_vs_best_baseline_start" in data
    assert any(line.startswith("zipf lukewarm") for line in lines)  # the readable table came first


def test_cli_runs_one_trace_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    sim.main(["--trace", "diurnal", "--requests", "300", "--models", "10", "--hosts", "2", "--cores", "2"])
    data = orjson.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(data["traces"]) == ["diurnal"] and data["trace"] == ["diurnal"]


# ---- the baselines ---------------------------------------------------------------


def test_consistent_hashing_keeps_a_model_on_its_host_until_that_host_is_over_its_bound() -> None:
    cfg = sim.Config(hosts=4)
    rng = random.Random(1)
    fleet = _fleet(cfg)
    req = sim.Request(arrival=sim.Arrival(index=0, at_ms=0.0, model=3, infer_ms=1.0))
    home = sim.route_consistent_hash(fleet, req, 0.0, rng)
    assert all(sim.route_consistent_hash(fleet, req, 0.0, rng) == home for _ in range(5))
    sim.add_load(fleet, fleet.hosts[home], 10)  # overloaded: the bounded-load rule moves the model to the next host on the ring
    assert sim.route_consistent_hash(fleet, req, 0.0, rng) != home


def test_multiplexing_prefers_a_host_holding_the_model() -> None:
    cfg = sim.Config(hosts=4)
    rng = random.Random(1)
    fleet = _fleet(cfg)
    _put(fleet, fleet.hosts[2], 7, sim.PAUSED, last_used=0.0)
    req = sim.Request(arrival=sim.Arrival(index=0, at_ms=0.0, model=7, infer_ms=1.0))
    assert {sim.route_multiplex(fleet, req, 0.0, rng) for _ in range(10)} == {2}
    sim.set_state(fleet, fleet.hosts[2], fleet.hosts[2].pools[7].replicas[0], sim.STOPPED_STATE)  # on disk only
    assert len({sim.route_multiplex(fleet, req, 0.0, rng) for _ in range(40)}) > 1


def test_multiplexing_holders_are_the_hosts_a_scan_finds_holding_the_model() -> None:
    fleet = _fleet(sim.Config(hosts=4))
    _put(fleet, fleet.hosts[3], 7, sim.RUNNING, last_used=0.0)
    _put(fleet, fleet.hosts[1], 7, sim.STARTING, last_used=0.0)
    _put(fleet, fleet.hosts[0], 7, sim.STOPPED_STATE, last_used=0.0)
    assert sorted(fleet.books.live[7]) == [h.index for h in fleet.hosts if sim.holds(h, 7)] == [1, 3]
    assert fleet.books == sim.scan_books(fleet.hosts)


# ---- the incremental books against a scan -----------------------------------------


@pytest.mark.parametrize("shape", sim.TRACES)
@pytest.mark.parametrize("policy", sim.POLICIES)
def test_books_equal_a_scan_of_the_fleet_throughout_a_run(shape: str, policy: str) -> None:
    """The running totals the baselines route by (total load, hosts by load, per model the hosts holding it live
    and the hosts starting it) equal a brute-force recount after every event, and at the end."""
    tight = dataclasses.replace(SMALL, max_replicas=4, memory_budget_mb=1536)  # evictions, refusals, every state
    rng = random.Random(11)
    models = sim.make_models(tight, rng)
    trace = sim.make_trace(tight, models, 600, rng, shape)
    fleet = sim.new_fleet(tight, models)
    checked = 0
    real = dict(sim.ROUTERS)

    def checking(fleet: sim.Fleet, req: sim.Request, now: float, rng: random.Random) -> int:
        nonlocal checked
        assert fleet.books == sim.scan_books(fleet.hosts)
        assert fleet.books.total_load == sum(h.load for h in fleet.hosts)
        assert fleet.books.min_load == min(h.load for h in fleet.hosts)
        assert {m: sorted(hs) for m, hs in fleet.books.live.items()} == {
            m: [h.index for h in fleet.hosts if sim.holds(h, m)] for m in range(len(models))
            if any(sim.holds(h, m) for h in fleet.hosts)}
        checked += 1
        return real[policy](fleet, req, now, rng)

    sim.ROUTERS[policy] = checking
    try:
        sim.simulate(tight, models, trace, policy, 5, fleet)
    finally:
        sim.ROUTERS[policy] = real[policy]
    assert checked >= len(trace) and fleet.counters.refused + fleet.counters.evicted > 0
    assert fleet.books == sim.scan_books(fleet.hosts)
    assert fleet.books.total_load == 0 == sum(h.load for h in fleet.hosts)  # every request answered


def test_books_follow_every_load_and_state_write() -> None:
    fleet = _fleet()
    host = fleet.hosts[1]
    replica = _put(fleet, host, 2, sim.STOPPED_STATE, last_used=0.0)
    assert 2 not in fleet.books.live
    for state in (sim.STARTING, sim.RUNNING, sim.PAUSED, sim.RESUMING, sim.RUNNING, sim.PAUSED, sim.STOPPED_STATE,
                  sim.STARTING):
        sim.set_state(fleet, host, replica, state)
        assert fleet.books == sim.scan_books(fleet.hosts)
    sim.add_load(fleet, host, 3)
    sim.add_load(fleet, fleet.hosts[0], 1)
    assert fleet.books == sim.scan_books(fleet.hosts) and fleet.books.min_load == 0
    sim.add_load(fleet, fleet.hosts[2], 1)
    assert fleet.books == sim.scan_books(fleet.hosts) and fleet.books.min_load == 1 and fleet.books.total_load == 5
    sim.retire(fleet, host, replica, "room")
    sim.add_load(fleet, host, -3)
    assert fleet.books == sim.scan_books(fleet.hosts) and fleet.books.min_load == 0 and not fleet.books.live


@pytest.mark.parametrize("hosts", [1, 2, 8, 1000])
def test_least_loaded_picks_and_draws_as_a_min_over_every_host_with_a_random_tie_break(hosts: int) -> None:
    """The fast least-loaded choice is ``min(hosts, key=(load, rng.random()))`` exactly: the same host, and the
    generator left in the same state, so a run's later draws are the same too."""
    fleet = _fleet(sim.Config(hosts=hosts))
    loads = random.Random(3)
    for h in fleet.hosts:
        sim.add_load(fleet, h, loads.choice([1, 2, 2, 3, 5]))
    req = sim.Request(arrival=sim.Arrival(index=0, at_ms=0.0, model=0, infer_ms=1.0))
    fast, slow = random.Random(9), random.Random(9)
    picks = set()
    for _ in range(200):
        got = sim.route_least_loaded(fleet, req, 0.0, fast)
        assert got == min(fleet.hosts, key=lambda h: (h.load, slow.random())).index
        assert fast.getstate() == slow.getstate()
        picks.add(got)
    assert all(fleet.hosts[p].load == fleet.books.min_load for p in picks)
    ties = sum(h.load == fleet.books.min_load for h in fleet.hosts)
    assert len(picks) == 1 if ties == 1 else len(picks) > 1  # ties broken at random


def test_least_draw_compares_whole_draws_when_the_first_words_tie() -> None:
    import array

    def words(*pairs: tuple[int, int]) -> array.array[int]:
        return array.array(sim._WORD, [w for pair in pairs for w in pair])

    # Host 1's first word is less, but only in the 5 bits random() drops: host 2's second word decides.
    assert sim.least_draw({0, 1, 2}, words((0xFFFF0000, 0), (0x00000020, 0xFFFFFFFF), (0x0000003F, 0))) == 2
    assert sim.least_draw({1, 2}, words((0, 0), (0x40, 0x7F), (0x5F, 0x40))) == 1  # same draw: the lower index
    assert sim.least_draw({0, 2}, words((0x40, 0), (0, 0), (0x41, 0))) == 0 and sim.least_draw({2}, words()) == 2


def test_cli_runs_only_the_policies_asked_for(capsys: pytest.CaptureFixture[str]) -> None:
    sim.main(["--seed", "3", "--requests", "300", "--models", "10", "--hosts", "3", "--max-replicas", "6",
              "--cores", "2", "--trace", "zipf", "--policies", "lukewarm,multiplex"])
    result = orjson.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["start_fraction"]) == {"lukewarm", "multiplex"} and result["best_baseline"] == "multiplex"
    assert result["ratio_vs_least_loaded"] is None
    for bad in ("multiplex", "lukewarm", "lukewarm,nosuch"):
        with pytest.raises(SystemExit):
            sim.main(["--requests", "100", "--policies", bad])
