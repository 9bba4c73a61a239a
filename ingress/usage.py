"""Usage and billing: requests and errors counted here, ``GET /api/v1/customers/{c}/usage`` answered here.

Counting never touches Redis on the request path: a request adds to a dict in
memory, and an owned loop (``app.py``) adds the counts to the hourly usage
hashes (``shared.keys.usage_hour``) every ``LUKEWARM_USAGE_FLUSH_S``, in few
pipelines of at most MAX_COMMANDS commands each, and once more at shutdown.
Replica-seconds come from the proxies (``runtime_proxy/usage.py``).

What counts, per version and UTC hour of the answer:
- ``requests``: every inference request whose version was resolved (the
  pointer named an existing version), whatever its outcome. Requests refused
  before that (400 malformed path or body, 401, 403, 404 unknown model or
  alias, 413, 429) name no version and are not counted.
- ``errors``: those of them answered with a status ≥ 400: 422 the model
  raised, 502 (crash, OOM, bad answer), 503 no capacity, 504 deadline, and a
  500 from an unexpected failure. A request whose client went away before the
  answer counts as a request, not an error (no answer was sent).
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import redis.asyncio as redis
from aiohttp import web

from ingress import state
from shared import keys
from shared.errors import bad_request, unavailable
from shared.http import json_response
from shared.messages import VersionSpec

log = logging.getLogger("lukewarm.ingress")

USAGE_PATH = "/api/v1/customers/{customer}/usage"
DEFAULT_SPAN_S = 86400
MAX_SPAN_S = 366 * 86400
# Hourly rows (one per version and hour) in one answer; past it the answer stops at a whole hour and
# says where to go on (``next_since``). ~100 bytes a row: about 1 MB at most.
MAX_ROWS = 10_000
# Commands per pipeline: packing one costs ~10 µs of event loop, so a flush or a read is cut into
# pipelines that each hold the loop ~1 ms, and answers go out in between.
MAX_COMMANDS = 128
# Counts held while Redis is unreachable (one per version and hour); new ones past it are dropped.
MAX_PENDING = 100_000
# Instants later than this are refused (the hour keys format years with four digits).
MAX_EPOCH_S = 253_402_300_799.0  # 9999-12-31T23:59:59Z
EPOCH_RE = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?")
INT_METRICS = ("requests", "errors")
FLOAT_METRICS = ("replica_seconds", "paused_seconds")

# (UTC hour, customer, model, branch, version)
Entry = tuple[int, str, str, str, int]
# (model, branch, version)
VersionId = tuple[str, str, int]
Rows = dict[VersionId, dict[str, float]]


# ---- counting (the request path) ----------------------------------------------------


def answered_with_error(exc: BaseException | None) -> bool:
    """Whether a request that ended with ``exc`` was answered with a status ≥ 400.

    An ``ApiError`` or HTTP exception carries its status; any other exception is the 500 the
    error middleware answers; a cancellation (the client went away) is answered with nothing.
    """
    if exc is None or not isinstance(exc, Exception):
        return False
    status = getattr(exc, "status", 500)
    return not isinstance(status, int) or status >= 400


class _Counting:
    """Counts one request of ``spec`` when its block ends (an error if it ends by a ≥ 400 exception)."""

    __slots__ = ("counter", "spec")

    def __init__(self, counter: UsageCounter, spec: VersionSpec) -> None:
        self.counter = counter
        self.spec = spec

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.counter.count(self.spec, answered_with_error(exc))  # and the exception, if any, goes on


class UsageCounter:
    """Requests and errors per version and hour, in memory until ``flush`` adds them to Redis.

    ``count`` is a dict update (no I/O). ``flush`` never raises for Redis: a pipeline that fails
    keeps its counts for the next flush (at least once: a connection lost after Redis applied
    them counts them twice — rare, and preferred to losing them).
    """

    def __init__(self, client: redis.Redis, clock: Callable[[], float] = time.time,
                 max_pending: int = MAX_PENDING) -> None:
        self.redis = client
        self.clock = clock
        self.max_pending = max_pending
        self.pending: dict[Entry, list[int]] = {}
        self.dropped = 0

    def counting(self, spec: VersionSpec) -> _Counting:
        """``with counter.counting(spec): …`` around everything a request does once its version is known."""
        return _Counting(self, spec)

    def count(self, spec: VersionSpec, error: bool) -> None:
        entry = (int(self.clock() // keys.USAGE_BUCKET_S), spec.customer, spec.model, spec.branch, spec.version)
        counts = self.pending.get(entry)
        if counts is None:
            if len(self.pending) >= self.max_pending:
                self.dropped += 1  # Redis has been away for long: bounded memory beats exact counts
                return
            counts = self.pending[entry] = [0, 0]
        counts[0] += 1
        if error:
            counts[1] += 1

    async def flush(self) -> int:
        """Add the pending counts to Redis; returns how many entries were written."""
        if self.dropped:
            log.warning("usage: %d requests not counted (too many counts pending while Redis was away)",
                        self.dropped)
            self.dropped = 0
        if not self.pending:
            return 0
        batch, self.pending = self.pending, {}
        items = list(batch.items())
        written = 0
        # Each entry is at most two HINCRBY and one EXPIRE.
        step = max(1, MAX_COMMANDS // 3)
        for start in range(0, len(items), step):
            chunk = items[start:start + step]
            try:
                await self._write(increments(chunk))
            except (redis.RedisError, OSError) as exc:
                for entry, counts in items[start:]:
                    kept = self.pending.setdefault(entry, [0, 0])
                    kept[0] += counts[0]
                    kept[1] += counts[1]
                log.warning("usage counts not written yet: %s", exc)
                break
            written += len(chunk)
        return written

    async def _write(self, writes: Mapping[str, Mapping[str, int]]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, fields in writes.items():
                for field, amount in fields.items():
                    pipe.hincrby(key, field, amount)
                pipe.expire(key, keys.USAGE_TTL_S)
            await pipe.execute()


def increments(entries: Sequence[tuple[Entry, Sequence[int]]]) -> dict[str, dict[str, int]]:
    """Counts as Redis writes: usage hash key → field → amount (zero counts left out)."""
    out: dict[str, dict[str, int]] = {}
    for (hour, customer, model, branch, version), counts in entries:
        fields = out.setdefault(keys.usage_hour(customer, hour), {})
        for metric, amount in zip(INT_METRICS, counts):
            if amount:
                field = keys.usage_field(model, branch, version, metric)
                fields[field] = fields.get(field, 0) + amount
    return out


USAGE = web.AppKey("usage_counter", UsageCounter)


# ---- the window ---------------------------------------------------------------------


def parse_instant(name: str, raw: str) -> float:
    """``raw`` as epoch seconds: digits (``1717236000``, ``1717236000.5``) or ISO 8601
    (``2024-06-01T10:00:00Z``, ``2024-06-01T12:00+02:00``, ``2024-06-01``; no offset means UTC)."""
    raw = raw.strip()
    if len(raw) > 40:
        raise bad_request(f"{name} is too long to be an instant")
    if EPOCH_RE.fullmatch(raw):
        value = float(raw)
    else:
        try:
            moment = datetime.datetime.fromisoformat(raw)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=datetime.UTC)
            value = moment.timestamp()
        except (ValueError, OverflowError, OSError):
            raise bad_request(f"{name} must be ISO 8601 (2024-06-01T10:00:00Z) or epoch seconds, "
                              f"got {raw[:40]!r}") from None
    if not 0 <= value <= MAX_EPOCH_S:
        raise bad_request(f"{name} must be between 1970 and 9999")
    return value


@dataclasses.dataclass(frozen=True)
class Window:
    """Whole UTC hours ``[first_hour, end_hour)`` (epoch seconds // 3600) overlapping ``[since, until)``."""

    first_hour: int
    end_hour: int


def usage_window(query: Mapping[str, str], now: float) -> Window:
    """The hours ``?since=&until=`` ask for: defaults the last 24 h; until after since; at most 366 days."""
    until = parse_instant("until", query["until"]) if "until" in query else now
    since = parse_instant("since", query["since"]) if "since" in query else until - DEFAULT_SPAN_S
    if until <= since:
        raise bad_request("until must be after since")
    if until - since > MAX_SPAN_S:
        raise bad_request(f"since to until spans more than {MAX_SPAN_S // 86400} days: ask in parts")
    return Window(math.floor(since / keys.USAGE_BUCKET_S), math.ceil(until / keys.USAGE_BUCKET_S))


# ---- the answer (pure) --------------------------------------------------------------


def parse_field(field: str) -> tuple[VersionId, str] | None:
    """``model/branch/version:metric`` → ((model, branch, version), metric); None for anything else."""
    name, sep, metric = field.rpartition(":")
    if not sep or metric not in keys.USAGE_METRICS:
        return None
    model, sep, rest = name.partition("/")
    branch, sep2, version = rest.rpartition("/")
    if not (sep and sep2 and model and branch and version.isascii() and version.isdigit()):
        return None
    return (model, branch, int(version)), metric


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def bucket_rows(raw: Mapping[Any, Any]) -> Rows:
    """One hour's usage hash (bytes or str, as Redis gives it) → version → metric → value."""
    rows: Rows = {}
    for field, value in raw.items():
        parsed = parse_field(_text(field))
        if parsed is None:
            continue
        try:
            amount = float(_text(value))
        except ValueError:
            continue
        version, metric = parsed
        rows.setdefault(version, {})[metric] = amount
    return rows


def _metrics(values: Mapping[str, float]) -> dict[str, float | int]:
    out: dict[str, float | int] = {m: int(values.get(m, 0)) for m in INT_METRICS}
    out.update({m: round(values.get(m, 0.0), 3) for m in FLOAT_METRICS})
    return out


def _add(into: dict[str, float], values: Mapping[str, float]) -> None:
    for metric, amount in values.items():
        into[metric] = into.get(metric, 0.0) + amount


def iso_hour(hour: int) -> str:
    return time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime(hour * keys.USAGE_BUCKET_S))


def usage_answer(customer: str, buckets: Sequence[tuple[int, Rows]], window: Window,
                 max_rows: int = MAX_ROWS) -> dict[str, Any]:
    """The answer for ``buckets`` ((hour, rows), hours ascending, empty hours left out).

    At most ``max_rows`` hourly rows, cut at a whole hour (one hour is never cut, so the first
    is always whole): then ``truncated`` is true, ``until`` is where the answer stops and
    ``next_since`` where the next call starts. Totals cover exactly the rows answered.
    """
    versions: dict[VersionId, tuple[dict[str, float], list[dict[str, Any]]]] = {}
    total: dict[str, float] = {}
    rows = 0
    covered_end = window.end_hour
    for hour, hour_rows in buckets:
        if rows and rows + len(hour_rows) > max_rows:
            covered_end = hour
            break
        rows += len(hour_rows)
        for version, values in sorted(hour_rows.items()):
            summed, hours = versions.setdefault(version, ({}, []))
            _add(summed, values)
            _add(total, values)
            hours.append({"hour": iso_hour(hour), **_metrics(values)})
    answer: dict[str, Any] = {
        "customer": customer, "since": iso_hour(window.first_hour), "until": iso_hour(covered_end),
        "bucket_s": keys.USAGE_BUCKET_S, "total": _metrics(total),
        "versions": [
            {"model": model, "branch": branch, "version": number, **_metrics(summed), "hours": hours}
            for (model, branch, number), (summed, hours) in sorted(versions.items())
        ],
        "truncated": covered_end != window.end_hour,
    }
    if answer["truncated"]:
        answer["next_since"] = iso_hour(covered_end)
    return answer


# ---- reading and the route ----------------------------------------------------------


async def read_buckets(client: redis.Redis, customer: str, window: Window,
                       max_rows: int = MAX_ROWS) -> list[tuple[int, Rows]]:
    """The non-empty hours of ``window``, ascending, in pipelines of MAX_COMMANDS reads; stops once
    more than ``max_rows`` rows in two hours or more are in hand (``usage_answer`` cuts before the
    last of them, so the hours left unread are never needed)."""
    out: list[tuple[int, Rows]] = []
    rows = 0
    for start in range(window.first_hour, window.end_hour, MAX_COMMANDS):
        hours = range(start, min(start + MAX_COMMANDS, window.end_hour))
        async with client.pipeline(transaction=False) as pipe:
            for hour in hours:
                pipe.hgetall(keys.usage_hour(customer, hour))
            raws = await pipe.execute()
        for hour, raw in zip(hours, raws):
            hour_rows = bucket_rows(raw) if raw else {}
            if hour_rows:
                out.append((hour, hour_rows))
                rows += len(hour_rows)
        if rows > max_rows and len(out) >= 2:
            break
    return out


Authorize = Callable[[web.Request], Awaitable[tuple[str, bool]]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def usage_handler(authorize: Authorize) -> Handler:
    """``GET …/usage`` with the management API's own check (``authorize``: the customer's deploy key or
    the admin, 401/403/404 as on every management route), passed in so this module needs no import of it."""

    async def read_usage(request: web.Request) -> web.Response:
        customer, _ = await authorize(request)
        window = usage_window(request.query, time.time())
        # This ingress's own recent counts first; other ingresses' arrive within their flush interval.
        await request.app[USAGE].flush()
        try:
            buckets = await read_buckets(request.app[state.REGISTRY].redis, customer, window)
        except (redis.RedisError, OSError) as exc:
            log.warning("usage of %s not read: %s", customer, exc)
            raise unavailable("the usage store is unreachable; try again", 2) from None
        return json_response(usage_answer(customer, buckets, window))

    return read_usage
