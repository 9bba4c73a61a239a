"""Steady traffic through one or more ingresses, every answer classified: ok, a clear error, or lost.

Shared by the fault tests and ``loadtests.chaos``. A call is *lost* when it got
neither a 200 nor a clear error: no answer in time, a broken connection, a
500, or an error that is not the contract's JSON shape (``{"error", "type"}``
with ``Retry-After`` on a 429 or 503). Callers spread over the ingresses round-robin
and, like a load balancer, move to the next one when an ingress refuses the
connection (it is restarting): a request that never got in is not a lost one.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
import orjson

# The contract's error statuses (shared/errors.py STATUS_OF) but 500: a fault of ours is a lost request.
CLEAR_STATUSES = frozenset({400, 401, 403, 404, 409, 413, 422, 429, 502, 503, 504})


@dataclasses.dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    clear_errors: int = 0
    lost: int = 0
    errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    # What the answered calls met, from Server-Timing: warm, lukewarm (woken), cold (started).
    starts: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    ok_ms: list[float] = dataclasses.field(default_factory=list)  # latency of each answered call
    lost_examples: list[str] = dataclasses.field(default_factory=list)

    def add(self, verdict: str, detail: str) -> None:
        self.sent += 1
        if verdict == "ok":
            self.ok += 1
        elif verdict == "clear":
            self.clear_errors += 1
            self.errors[detail] += 1
        else:
            self.lost += 1
            if len(self.lost_examples) < 20:
                self.lost_examples.append(detail)

    def figures(self) -> dict[str, Any]:
        return {"sent": self.sent, "ok": self.ok, "clear_errors": self.clear_errors, "lost": self.lost,
                "errors": dict(self.errors)}


def classify(status: int, body: bytes, headers: Any, expected: Callable[[Any], bool] | None = None) -> tuple[str, str]:
    """``("ok" | "clear" | "lost", detail)`` for one answer."""
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return "lost", f"{status} not JSON: {body[:100]!r}"
    if status == 200:
        if expected is not None and not expected(parsed):
            return "lost", f"200 with a wrong answer: {str(parsed)[:200]}"
        return "ok", ""
    if not isinstance(parsed, dict) or not isinstance(parsed.get("error"), str):
        return "lost", f"{status} not the error shape: {str(parsed)[:200]}"
    kind = str(parsed.get("type"))
    if status not in CLEAR_STATUSES or not isinstance(parsed.get("type"), str):
        return "lost", f"{status} {kind}: {parsed.get('error')}"[:300]
    if status in (429, 503) and "Retry-After" not in headers:
        return "lost", f"{status} {kind} without Retry-After"
    return "clear", f"{status} {kind}"


def start_kind(server_timing: str) -> str:
    """``warm``, ``lukewarm`` or ``cold``: what a call met, as its Server-Timing header says."""
    marker = 'start;desc="'
    return server_timing.split(marker, 1)[1].split('"', 1)[0] if marker in server_timing else ""


class Traffic:
    """``callers`` loops, each sending one call at a time (or paced at ``rate_per_s`` in all) until stopped."""

    def __init__(self, urls: Sequence[str] | Callable[[], Sequence[str]], headers: dict[str, str], path: str,
                 payload: Callable[[int], Any], callers: int = 4, timeout_s: float = 30.0,
                 rate_per_s: float = 0.0, expected: Callable[[int, Any], bool] | None = None) -> None:
        self.urls = urls if callable(urls) else (lambda: urls)
        self.headers = {"Content-Type": "application/json", **headers}
        self.path = path
        self.payload = payload
        self.callers = callers
        self.timeout_s = timeout_s
        self.rate_per_s = rate_per_s
        self.expected = expected
        self.tally = Tally()
        self._counter = itertools.count()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "Traffic":
        self._session = aiohttp.ClientSession()
        self._tasks = [asyncio.create_task(self._loop(i)) for i in range(self.callers)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> Tally:
        """Stop sending; the calls in flight are waited for (each bounded by ``timeout_s``)."""
        self._stop.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None
        return self.tally

    async def _loop(self, caller: int) -> None:
        interval = self.callers / self.rate_per_s if self.rate_per_s > 0 else 0.0
        next_at = time.monotonic() + (caller * interval / self.callers if interval else 0.0)
        while not self._stop.is_set():
            n = next(self._counter)
            t0 = time.monotonic()
            verdict, detail = await self.one(n)
            self.tally.add(verdict, detail)
            if verdict == "ok":
                self.tally.ok_ms.append((time.monotonic() - t0) * 1000)
                if detail:
                    self.tally.starts[detail] += 1
            if interval:
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    try:
                        await asyncio.wait_for(self._stop.wait(), delay)
                    except TimeoutError:
                        pass

    async def one(self, n: int) -> tuple[str, str]:
        """Call ``n``: through the first ingress that takes the connection (as a load balancer would).
        The verdict, and what the call met (ok) or what went wrong."""
        assert self._session is not None
        body = orjson.dumps(self.payload(n))
        urls = list(self.urls())
        deadline = time.monotonic() + self.timeout_s
        refused = ""
        for attempt in range(len(urls) * 20):
            url = urls[(n + attempt) % len(urls)]
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                async with self._session.post(url + self.path, data=body, headers=self.headers,
                                              timeout=aiohttp.ClientTimeout(total=left)) as resp:
                    data = await resp.read()
                    expected = self.expected
                    verdict, detail = classify(resp.status, data, resp.headers,
                                               None if expected is None else (lambda parsed: expected(n, parsed)))
                    return verdict, start_kind(resp.headers.get("Server-Timing", "")) if verdict == "ok" else detail
            except aiohttp.ClientConnectorError as exc:
                refused = f"connect: {exc}"  # never got in: the balancer tries the next ingress
                if attempt % len(urls) == len(urls) - 1:
                    try:  # every ingress refused: all restarting at once; wait a little, bounded
                        await asyncio.wait_for(self._stop.wait(), 0.1)
                    except TimeoutError:
                        pass
                continue
            except aiohttp.ClientOSError as exc:
                if "Can not write request" not in str(exc):
                    return "lost", f"{type(exc).__name__}: {exc}"[:300]
                # A kept-alive connection the ingress closed (it is draining) as the request went out:
                # nothing reached it, and a balancer sends such a request to the next ingress.
                refused = f"closed before the request was written: {exc}"
                continue
            except (aiohttp.ClientError, TimeoutError) as exc:
                return "lost", f"{type(exc).__name__}: {exc}"[:300]
        return "lost", f"no ingress took the connection in {self.timeout_s:g} s ({refused})"
