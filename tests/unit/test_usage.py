"""Usage and billing, the pure parts: replica-seconds from replica states, request counts, the window,
the answer's shape; the Redis writes and reads against fakeredis."""
from __future__ import annotations

import asyncio
import calendar
import logging
import random
from typing import Any

import fakeredis.aioredis
import pytest
import redis
from aiohttp import web

from ingress.usage import (
    MAX_COMMANDS, UsageCounter, Window, answered_with_error, bucket_rows, increments, parse_field,
    parse_instant, read_buckets, usage_answer, usage_window,
)
from runtime_proxy import usage as proxy_usage
from runtime_proxy.usage import UsageMeter, accrue, hour_spans, split_version_key, state_counts
from shared import keys
from lukewarm.cli import usage_table
from shared.errors import ApiError
from shared.messages import VersionSpec

H = 3600
T0 = calendar.timegm((2024, 6, 1, 10, 0, 0))  # 2024-06-01T10:00:00Z, an hour boundary
HOUR = T0 // H
V1 = "acme/echo/main/1"


def replica(version: str, state: str, rid: str = "r") -> dict[str, Any]:
    return {"replica_id": rid, "version": version, "state": state}


# ---- runtime_proxy/usage.py: replica-seconds ---------------------------------------------------


@pytest.mark.parametrize(
    ("replicas", "expected"),
    [
        ([], {}),
        ([replica(V1, "running")], {(V1, "replica_seconds"): 1}),
        ([replica(V1, "running", "a"), replica(V1, "running", "b"), replica(V1, "paused", "c")],
         {(V1, "replica_seconds"): 2, (V1, "paused_seconds"): 1}),
        ([replica(V1, s) for s in ("starting", "stopped", "dead", "pausing", "")], {}),  # not billed
        ([{"state": "running"}, {"version": 7, "state": "running"}], {}),  # malformed entries are skipped
    ],
)
def test_state_counts(replicas: list[dict[str, Any]], expected: dict[tuple[str, str], int]) -> None:
    assert state_counts(replicas) == expected


@pytest.mark.parametrize(
    ("start", "end", "spans"),
    [
        (T0, T0 + 10, [(HOUR, 10)]),
        (T0 + H - 4, T0 + H + 6, [(HOUR, 4), (HOUR + 1, 6)]),  # across an hour boundary
        (T0 - 1, T0 + 2 * H + 1, [(HOUR - 1, 1), (HOUR, H), (HOUR + 1, H), (HOUR + 2, 1)]),
        (T0, T0, []),
        (T0 + 5, T0, []),
    ],
)
def test_hour_spans(start: float, end: float, spans: list[tuple[int, float]]) -> None:
    assert hour_spans(start, end) == spans


RUN, PAUSE = (V1, "replica_seconds"), (V1, "paused_seconds")


@pytest.mark.parametrize(
    ("before", "after", "start", "end", "expected"),
    [
        ({RUN: 1}, {RUN: 1}, T0, T0 + 2, {(HOUR, *RUN): 2.0}),  # steady: the whole interval
        ({RUN: 3}, {RUN: 3}, T0, T0 + 2, {(HOUR, *RUN): 6.0}),  # three replicas
        ({}, {RUN: 1}, T0, T0 + 2, {(HOUR, *RUN): 1.0}),  # started in between: half
        ({RUN: 1}, {PAUSE: 1}, T0, T0 + 2, {(HOUR, *RUN): 1.0, (HOUR, *PAUSE): 1.0}),  # paused in between
        ({RUN: 1}, {}, T0, T0 + 2, {(HOUR, *RUN): 1.0}),  # went away in between
        ({RUN: 1}, {RUN: 1}, T0 + H - 1, T0 + H + 3, {(HOUR, *RUN): 1.0, (HOUR + 1, *RUN): 3.0}),
        ({RUN: 1}, {RUN: 1}, T0, T0, {}),  # no time passed
        ({}, {}, T0, T0 + 2, {}),
    ],
)
def test_accrue(before: dict[tuple[str, str], int], after: dict[tuple[str, str], int], start: float, end: float,
                expected: dict[tuple[int, str, str], float]) -> None:
    assert accrue(before, after, start, end) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("key", "parts"),
    [
        ("acme/echo/main/1", ("acme", "echo", "main", 1)),
        ("acme/echo/feat/x.y/12", ("acme", "echo", "feat/x.y", 12)),  # a branch may hold '/'
        ("acme/echo/main", None),
        ("acme/echo/main/latest", None),
    ],
)
def test_split_version_key(key: str, parts: tuple[str, str, str, int] | None) -> None:
    assert split_version_key(key) == parts


def test_proxy_increments_group_by_customer_and_hour() -> None:
    pending = {(HOUR, V1, "replica_seconds"): 1.23449, (HOUR, V1, "paused_seconds"): 0.0001,
               (HOUR + 1, "acme/echo/feat/x/2", "replica_seconds"): 2.0, (HOUR, "bad", "replica_seconds"): 5.0}
    assert proxy_usage.increments(pending) == {
        keys.usage_hour("acme", HOUR): {"echo/main/1:replica_seconds": 1.234},  # ms; sub-ms amounts dropped
        keys.usage_hour("acme", HOUR + 1): {"echo/feat/x/2:replica_seconds": 2.0},
    }
    assert keys.usage_hour("acme", HOUR) == "lw:usage:acme:2024060110"


def unreachable() -> fakeredis.aioredis.FakeRedis:
    """A Redis whose every call fails with a connection error."""
    server = fakeredis.FakeServer()
    server.connected = False
    return fakeredis.aioredis.FakeRedis(server=server)


class Clock:
    def __init__(self, wall: float) -> None:
        self.wall = wall
        self.mono = 1000.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def meter(client: Any, replicas: list[dict[str, Any]], clock: Clock, flush_every_s: float = 10.0) -> UsageMeter:
    return UsageMeter(client, lambda: list(replicas), flush_every_s, wall=lambda: clock.wall,
                      monotonic=lambda: clock.mono)


async def test_meter_counts_by_the_clock_and_flushes_to_hourly_buckets(client: fakeredis.aioredis.FakeRedis) -> None:
    clock = Clock(T0 + H - 3)
    replicas = [replica(V1, "running")]
    m = meter(client, replicas, clock)
    await m.tick()  # the first tick only records
    clock.advance(5)  # one late tick (a busy loop): the 5 s still count, split at the hour
    await m.tick()
    replicas[0]["state"] = "paused"
    clock.advance(4)
    await m.tick()
    clock.advance(2)
    await m.tick()  # 11 s since the first flush window opened: written now
    assert await client.hgetall(keys.usage_hour("acme", HOUR)) == {b"echo/main/1:replica_seconds": b"3"}
    after = await client.hgetall(keys.usage_hour("acme", HOUR + 1))
    assert float(after[b"echo/main/1:replica_seconds"]) == pytest.approx(2 + 2)  # 2 s, then half of 4
    assert float(after[b"echo/main/1:paused_seconds"]) == pytest.approx(2 + 2)
    assert 0 < await client.ttl(keys.usage_hour("acme", HOUR)) <= keys.USAGE_TTL_S
    assert m.pending == {}


async def test_meter_keeps_its_seconds_when_redis_fails() -> None:
    broken = unreachable()
    clock = Clock(T0)
    m = meter(broken, [replica(V1, "running")], clock)
    m.sample()
    clock.advance(3)
    m.sample()
    assert await m.flush() is False
    assert m.pending == {(HOUR, V1, "replica_seconds"): pytest.approx(3.0)}
    await broken.aclose()


@pytest.mark.parametrize("tick_s", [0.5, 2.0, 5.0])
def test_billed_time_is_within_half_a_tick_per_transition(tick_s: float) -> None:
    """A replica that starts, runs, pauses and goes at random moments between ticks: the billed running and
    paused seconds stay within half a tick per transition of the true time (the design's 10 % at a minute)."""
    rng = random.Random(7)
    for _ in range(50):
        start = T0 + rng.uniform(0, 10)
        paused_at = start + rng.uniform(30, 120)
        gone_at = paused_at + rng.uniform(30, 120)
        clock = Clock(T0)
        replicas: list[dict[str, Any]] = []
        m = meter(None, replicas, clock)
        m.sample()
        while clock.wall < gone_at + 2 * tick_s:
            clock.advance(tick_s * rng.uniform(0.8, 1.6))  # ticks drift and come late
            t = clock.wall
            replicas[:] = [replica(V1, "running")] if start <= t < paused_at else \
                [replica(V1, "paused")] if paused_at <= t < gone_at else []
            m.sample()
        billed_running = sum(s for (_, _, metric), s in m.pending.items() if metric == "replica_seconds")
        billed_paused = sum(s for (_, _, metric), s in m.pending.items() if metric == "paused_seconds")
        late = 1.6 * tick_s / 2
        assert abs(billed_running - (paused_at - start)) <= 2 * late
        assert abs(billed_paused - (gone_at - paused_at)) <= 2 * late
        assert abs(billed_running - (paused_at - start)) / (paused_at - start) < 0.10


# ---- ingress/usage.py: counting requests ------------------------------------------------------


def spec(version: int = 1, branch: str = "main", customer: str = "acme") -> VersionSpec:
    return VersionSpec(customer=customer, model="echo", branch=branch, version=version, image="dir:/x")


@pytest.mark.parametrize(
    ("exc", "error"),
    [
        (None, False),
        (ApiError(422, "model_error", "ValueError: bad input"), True),
        (ApiError(503, "unavailable", "no capacity"), True),
        (ApiError(504, "timeout", "deadline"), True),
        (RuntimeError("unexpected"), True),  # the error middleware's 500
        (web.HTTPFound("/elsewhere"), False),
        (web.HTTPBadGateway(), True),
        (asyncio.CancelledError(), False),  # the client went away: no answer
    ],
)
def test_answered_with_error(exc: BaseException | None, error: bool) -> None:
    assert answered_with_error(exc) is error


async def test_counter_counts_in_memory_and_flushes_in_hourly_buckets(client: fakeredis.aioredis.FakeRedis) -> None:
    now = [T0 + H - 1.0]
    counter = UsageCounter(client, clock=lambda: now[0])
    for _ in range(3):
        with counter.counting(spec()):
            pass
    with pytest.raises(ApiError), counter.counting(spec()):
        raise ApiError(422, "model_error", "ValueError: bad input")
    now[0] += 2  # the next hour
    with counter.counting(spec(2, "feat/x")):
        pass
    assert await client.keys("*") == []  # nothing written on the request path
    assert await counter.flush() == 2
    assert await client.hgetall(keys.usage_hour("acme", HOUR)) == {
        b"echo/main/1:requests": b"4", b"echo/main/1:errors": b"1"}
    assert await client.hgetall(keys.usage_hour("acme", HOUR + 1)) == {b"echo/feat/x/2:requests": b"1"}
    assert 0 < await client.ttl(keys.usage_hour("acme", HOUR)) <= keys.USAGE_TTL_S
    assert await counter.flush() == 0


async def test_counter_writes_many_versions_in_several_small_pipelines(client: fakeredis.aioredis.FakeRedis) -> None:
    counter = UsageCounter(client, clock=lambda: T0)
    for version in range(1, 501):
        counter.count(spec(version), error=version % 2 == 0)
    sent: list[int] = []
    real_pipeline = client.pipeline

    def counting_pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = real_pipeline(*args, **kwargs)
        real_execute = pipe.execute

        async def execute(*a: Any, **k: Any) -> Any:
            sent.append(len(pipe.command_stack))
            return await real_execute(*a, **k)

        pipe.execute = execute  # type: ignore[method-assign]
        return pipe

    client.pipeline = counting_pipeline  # type: ignore[method-assign]
    assert await counter.flush() == 500
    assert len(sent) > 1 and max(sent) <= MAX_COMMANDS
    stored = await client.hgetall(keys.usage_hour("acme", HOUR))
    assert len(stored) == 500 + 250
    assert stored[b"echo/main/500:errors"] == b"1" and b"echo/main/499:errors" not in stored


async def test_counter_keeps_its_counts_when_redis_fails_and_bounds_them(caplog: pytest.LogCaptureFixture) -> None:
    broken = unreachable()
    counter = UsageCounter(broken, clock=lambda: T0, max_pending=2)
    counter.count(spec(1), error=True)
    counter.count(spec(1), error=False)
    counter.count(spec(2), error=False)
    counter.count(spec(3), error=False)  # a third version past the bound: dropped, and said so
    with caplog.at_level(logging.WARNING, logger="lukewarm.ingress"):
        assert await counter.flush() == 0
    assert counter.pending == {(HOUR, "acme", "echo", "main", 1): [2, 1], (HOUR, "acme", "echo", "main", 2): [1, 0]}
    assert "1 requests not counted" in caplog.text and "usage counts not written yet" in caplog.text
    await broken.aclose()


async def test_counter_keeps_only_what_a_failed_pipeline_did_not_write(client: fakeredis.aioredis.FakeRedis) -> None:
    counter = UsageCounter(client, clock=lambda: T0)
    for version in range(1, 101):
        counter.count(spec(version), error=False)
    executed = 0
    real_pipeline = client.pipeline

    def failing_second(*args: Any, **kwargs: Any) -> Any:
        pipe = real_pipeline(*args, **kwargs)
        real_execute = pipe.execute

        async def execute(*a: Any, **k: Any) -> Any:
            nonlocal executed
            executed += 1
            if executed == 2:
                raise redis.ConnectionError("gone")
            return await real_execute(*a, **k)

        pipe.execute = execute  # type: ignore[method-assign]
        return pipe

    client.pipeline = failing_second  # type: ignore[method-assign]
    written = await counter.flush()
    assert 0 < written < 100 and len(counter.pending) == 100 - written
    assert len(await client.hgetall(keys.usage_hour("acme", HOUR))) == written
    assert await counter.flush() == 100 - written  # the next round writes the rest, once
    stored = await client.hgetall(keys.usage_hour("acme", HOUR))
    assert len(stored) == 100 and set(stored.values()) == {b"1"}


def test_increments_leave_out_zero_errors() -> None:
    entries = [((HOUR, "acme", "echo", "main", 1), [2, 0]), ((HOUR, "beta", "m", "b/c", 3), [1, 1])]
    assert increments(entries) == {
        keys.usage_hour("acme", HOUR): {"echo/main/1:requests": 2},
        keys.usage_hour("beta", HOUR): {"m/b/c/3:requests": 1, "m/b/c/3:errors": 1},
    }


# ---- ingress/usage.py: the window ------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("1717236000", 1717236000.0),
        ("1717236000.5", 1717236000.5),
        ("2024-06-01T10:00:00Z", T0),
        ("2024-06-01T10:00:00+00:00", T0),
        ("2024-06-01T12:00+02:00", T0),
        ("2024-06-01T10:00:00", T0),  # no offset: UTC
        ("2024-06-01", T0 - 10 * H),
        (" 2024-06-01T10:00:00Z ", T0),
    ],
)
def test_parse_instant(raw: str, value: float) -> None:
    assert parse_instant("since", raw) == value


@pytest.mark.parametrize("raw", ["", "yesterday", "-5", "1e9", "nan", "inf", "2024-13-01", "2024-06-01T25:00",
                                 "1" * 13, "0001-01-01T00:00:00+01:00", "x" * 100, "1717236000,5"])
def test_parse_instant_refuses(raw: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_instant("since", raw)
    assert caught.value.status == 400 and caught.value.type == "bad_request"
    assert "\n" not in caught.value.message


NOW = T0 + 1800.0  # 10:30


@pytest.mark.parametrize(
    ("query", "window"),
    [
        ({}, Window(HOUR - 24, HOUR + 1)),  # the last 24 h, in whole hours
        ({"since": str(T0)}, Window(HOUR, HOUR + 1)),
        ({"since": str(T0 - 1), "until": str(T0)}, Window(HOUR - 1, HOUR)),  # until is exclusive
        ({"until": str(T0 + 2 * H)}, Window(HOUR - 22, HOUR + 2)),
        ({"since": "2024-01-01T00:00:00Z", "until": "2024-12-31T00:00:00Z"},
         Window(calendar.timegm((2024, 1, 1, 0, 0, 0)) // H, calendar.timegm((2024, 12, 31, 0, 0, 0)) // H)),
    ],
)
def test_usage_window(query: dict[str, str], window: Window) -> None:
    assert usage_window(query, NOW) == window


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"since": str(T0), "until": str(T0)}, "until must be after since"),
        ({"since": str(NOW + 10)}, "until must be after since"),  # since in the future, until now
        ({"since": "2023-01-01T00:00:00Z", "until": "2024-06-01T00:00:00Z"}, "more than 366 days"),
        ({"until": "soon"}, "until must be ISO 8601"),
    ],
)
def test_usage_window_refuses(query: dict[str, str], message: str) -> None:
    with pytest.raises(ApiError) as caught:
        usage_window(query, NOW)
    assert caught.value.status == 400 and message in caught.value.message


# ---- ingress/usage.py: the answer --------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "parsed"),
    [
        ("echo/main/1:requests", (("echo", "main", 1), "requests")),
        ("echo/feat/x.y/12:paused_seconds", (("echo", "feat/x.y", 12), "paused_seconds")),
        ("echo/main/1:bogus", None),
        ("echo/main:requests", None),
        ("echo/main/one:requests", None),
        ("echo/main/1", None),
        ("/main/1:requests", None),
    ],
)
def test_parse_field(field: str, parsed: tuple[tuple[str, str, int], str] | None) -> None:
    assert parse_field(field) == parsed


def test_bucket_rows_take_what_redis_gives() -> None:
    raw = {b"echo/main/1:requests": b"4", b"echo/main/1:replica_seconds": b"12.5", "echo/main/2:errors": "1",
           b"junk": b"1", b"echo/main/1:errors": b"not-a-number"}
    assert bucket_rows(raw) == {("echo", "main", 1): {"requests": 4.0, "replica_seconds": 12.5},
                                ("echo", "main", 2): {"errors": 1.0}}


def rows(*versions: int, requests: float = 1.0) -> dict[tuple[str, str, int], dict[str, float]]:
    return {("echo", "main", v): {"requests": requests, "replica_seconds": 1.5} for v in versions}


def test_usage_answer_shape() -> None:
    buckets = [(HOUR, rows(1, 2)), (HOUR + 2, {("echo", "main", 1): {"requests": 3.0, "errors": 1.0,
                                                                       "paused_seconds": 10.0004}})]
    answer = usage_answer("acme", buckets, Window(HOUR, HOUR + 3))
    assert answer == {
        "customer": "acme", "since": "2024-06-01T10:00:00Z", "until": "2024-06-01T13:00:00Z", "bucket_s": 3600,
        "total": {"requests": 5, "errors": 1, "replica_seconds": 3.0, "paused_seconds": 10.0},
        "versions": [
            {"model": "echo", "branch": "main", "version": 1, "requests": 4, "errors": 1, "replica_seconds": 1.5,
             "paused_seconds": 10.0, "hours": [
                 {"hour": "2024-06-01T10:00:00Z", "requests": 1, "errors": 0, "replica_seconds": 1.5,
                  "paused_seconds": 0.0},
                 {"hour": "2024-06-01T12:00:00Z", "requests": 3, "errors": 1, "replica_seconds": 0.0,
                  "paused_seconds": 10.0}]},
            {"model": "echo", "branch": "main", "version": 2, "requests": 1, "errors": 0, "replica_seconds": 1.5,
             "paused_seconds": 0.0, "hours": [
                 {"hour": "2024-06-01T10:00:00Z", "requests": 1, "errors": 0, "replica_seconds": 1.5,
                  "paused_seconds": 0.0}]},
        ],
        "truncated": False,
    }
    empty = usage_answer("acme", [], Window(HOUR, HOUR + 1))
    assert empty["versions"] == [] and empty["total"]["requests"] == 0 and not empty["truncated"]


@pytest.mark.parametrize(
    ("sizes", "max_rows", "kept_hours"),
    [
        ([2, 2, 2], 6, 3),
        ([2, 2, 2], 5, 2),  # cut at a whole hour
        ([2, 2, 2], 1, 1),  # the first hour is always whole
        ([7], 3, 1),
    ],
)
def test_usage_answer_is_bounded(sizes: list[int], max_rows: int, kept_hours: int) -> None:
    buckets = [(HOUR + i, rows(*range(1, n + 1))) for i, n in enumerate(sizes)]
    window = Window(HOUR, HOUR + 10)
    answer = usage_answer("acme", buckets, window, max_rows=max_rows)
    answered = sum(len(v["hours"]) for v in answer["versions"])
    assert answered == sum(sizes[:kept_hours])
    assert answer["total"]["requests"] == answered  # totals cover exactly what is answered
    if kept_hours < len(sizes):
        assert answer["truncated"] and answer["next_since"] == answer["until"]
        assert answer["until"] == usage_answer("x", [], Window(HOUR + kept_hours, HOUR + 11))["since"]
    else:
        assert not answer["truncated"] and "next_since" not in answer


async def test_read_buckets_reads_the_window_in_small_pipelines(client: fakeredis.aioredis.FakeRedis) -> None:
    for hour in (HOUR - 1, HOUR, HOUR + 300, HOUR + 301):
        await client.hset(keys.usage_hour("acme", hour), "echo/main/1:requests", hour - HOUR + 10)
    await client.hset(keys.usage_hour("other", HOUR), "echo/main/1:requests", 99)
    got = await read_buckets(client, "acme", Window(HOUR, HOUR + 301))
    assert got == [(HOUR, {("echo", "main", 1): {"requests": 10.0}}),
                   (HOUR + 300, {("echo", "main", 1): {"requests": 310.0}})]
    # More rows than the answer holds: the reading stops once a later hour would be cut anyway.
    early = await read_buckets(client, "acme", Window(HOUR - 1, HOUR + 400), max_rows=1)
    assert [hour for hour, _ in early] == [HOUR - 1, HOUR]


# ---- the CLI's table -----------------------------------------------------------------------------


def test_usage_table() -> None:
    answer = usage_answer("acme", [(HOUR, rows(1, 12))], Window(HOUR, HOUR + 1))
    lines = usage_table(answer).splitlines()
    assert lines[0] == "usage of acme from 2024-06-01T10:00:00Z to 2024-06-01T11:00:00Z (UTC, 60-minute buckets)"
    assert lines[1].split() == ["MODEL", "BRANCH", "VERSION", "REQUESTS", "ERRORS", "RUNNING_S", "PAUSED_S"]
    assert lines[2].split() == ["echo", "main", "1", "1", "0", "1.5", "0.0"]
    assert lines[3].split() == ["echo", "main", "12", "1", "0", "1.5", "0.0"]
    assert lines[4].split() == ["TOTAL", "2", "0", "3.0", "0.0"]
    assert len({len(line) for line in lines[1:]}) == 1  # columns line up
    hourly = usage_table(answer, hourly=True).splitlines()
    assert hourly[2].split() == ["echo", "main", "1", "2024-06-01T10:00:00Z", "1", "0", "1.5", "0.0"]
    cut = usage_answer("acme", [(HOUR, rows(1)), (HOUR + 1, rows(1))], Window(HOUR, HOUR + 5), max_rows=1)
    assert usage_table(cut).splitlines()[-1] == "(more: run again with --since 2024-06-01T11:00:00Z)"
