"""What slow-loris connections cost normal calls: latency without and with N slow connections open.

``python -m loadtests.slowloris [--runtime docker|process] [--connections 200] [--calls 500]
[--header-timeout-s 2] [--rounds 3]``

Deploys an echo model and warms it, then measures calls at concurrency 1
(one aiohttp session, keep-alive) in alternating rounds of two phases: with
nothing else going on, and while ``--connections`` connections each send a
partial request head one byte a second and are reopened whenever the ingress
closes them, as the attack tool does. The ingress's header deadline (``header_timeout_s``) is what
bounds each slow connection; the table also shows how long they lived.

Prints a table, then as the last line one JSON object (``"bench": "slowloris"``).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import time
from collections import Counter
from typing import Any

from loadtests.common import BenchStack, bench_stack, default_runtime, log, p50, p99, percentile, report, \
    run_async, wait_until

ECHO_SOURCE = "def echo(x):\n    return x\n"
PAYLOAD: dict[str, Any] = {"text": "hello world", "n": 42}
CONNECT_TIMEOUT_S = 10.0


def slow_head(host: str) -> bytes:
    """A request head that never ends: after these bytes, the attack sends ``a`` forever."""
    return (f"POST /v1/echo/latest HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"X-Slow: ").encode()


@dataclasses.dataclass
class SlowStats:
    opened: int = 0
    # Open → closed by the server, per closed connection (seconds).
    lifetimes_s: list[float] = dataclasses.field(default_factory=list)
    # Connections that got bytes back before closing (an HTTP answer instead of a plain close).
    answered: int = 0
    connect_errors: int = 0
    live: int = 0


class SlowLoris:
    """``connections`` sockets dribbling a request head, one byte every ``interval_s``, reopened when closed.

    An async context manager: entering starts them (staggered over one interval) and
    returns once each has opened; leaving cancels them and awaits every task.
    """

    def __init__(self, host: str, port: int, connections: int, head: bytes, interval_s: float = 1.0,
                 rng: random.Random | None = None) -> None:
        self.host, self.port = host, port
        self.connections = connections
        self.head = head
        self.interval_s = interval_s
        self.rng = rng or random.Random(0)
        self.stats = SlowStats()
        self._tasks: list[asyncio.Task[None]] = []
        # The flag, not only the cancellation, ends the loops: on Python 3.11 wait_for can turn a
        # cancellation that races with its own timeout into a TimeoutError, which the loops retry.
        self._stopping = False

    async def __aenter__(self) -> SlowLoris:
        self._tasks = [asyncio.create_task(self._attacker(i), name=f"slowloris-{i}")
                       for i in range(self.connections)]
        await wait_until(lambda: self.stats.opened >= self.connections, self.interval_s + CONNECT_TIMEOUT_S,
                         f"{self.connections} slow connections to open")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), self.interval_s + CONNECT_TIMEOUT_S)

    async def _attacker(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(self.rng.uniform(0, self.interval_s))  # not all in step
        while not self._stopping:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port),
                                                        CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError):
                self.stats.connect_errors += 1
                await asyncio.sleep(self.interval_s)
                continue
            opened = loop.time()
            self.stats.opened += 1
            self.stats.live += 1
            try:
                await self._dribble(reader, writer)
                if not self._stopping:  # closed by the server, not ended by us
                    self.stats.lifetimes_s.append(loop.time() - opened)
            finally:
                self.stats.live -= 1
                writer.close()

    async def _dribble(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Send a byte per interval until the server closes the connection."""
        sent = 0
        while not self._stopping:
            writer.write(self.head[sent:sent + 1] if sent < len(self.head) else b"a")
            sent += 1
            try:
                got = await asyncio.wait_for(reader.read(4096), self.interval_s)
            except TimeoutError:
                continue  # still open: the next byte
            except ConnectionError:
                return
            if got:
                self.stats.answered += 1
                await asyncio.wait_for(reader.read(), CONNECT_TIMEOUT_S)  # the close that follows
            return


async def timed_calls(stack: BenchStack, model: str, n: int, min_s: float = 0.0,
                      call_timeout_s: float = 30.0) -> tuple[list[float], Counter[int]]:
    """Latencies (ms) and statuses of calls at concurrency 1: at least ``n``, for at least ``min_s``."""
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    started = time.perf_counter()
    while len(latencies) < n or time.perf_counter() - started < min_s:
        t0 = time.perf_counter()
        status, _, _ = await stack.call(model, PAYLOAD, timeout_s=call_timeout_s)
        latencies.append((time.perf_counter() - t0) * 1000)
        statuses[status] += 1
    return latencies, statuses


def summary(lifetimes_s: list[float]) -> dict[str, float]:
    return {"p50": p50(lifetimes_s), "p99": p99(lifetimes_s), "max": max(lifetimes_s, default=float("nan"))}


@dataclasses.dataclass
class Phase:
    """Normal calls of one kind of phase, over all rounds."""

    latencies_ms: list[float] = dataclasses.field(default_factory=list)
    statuses: Counter[int] = dataclasses.field(default_factory=Counter)

    def add(self, latencies_ms: list[float], statuses: Counter[int]) -> None:
        self.latencies_ms += latencies_ms
        self.statuses += statuses

    @property
    def errors(self) -> int:
        return sum(count for status, count in self.statuses.items() if status != 200)


async def bench(runtime: str, connections: int, calls: int, header_timeout_s: float, rounds: int) -> None:
    t_begin = time.perf_counter()
    settings = {"header_timeout_s": header_timeout_s, "max_connections": max(4096, connections * 2)}
    phases = {"without": Phase(), "with": Phase()}
    slow = SlowStats()
    # Every phase outlives a few header deadlines, so each slow connection is cut off and reopened.
    phase_s = 3 * header_timeout_s
    per_round = max(1, calls // rounds)
    async with bench_stack(runtime, ingress_settings=settings) as stack:
        image = await asyncio.to_thread(stack.model, "echo", ECHO_SOURCE)
        await stack.deploy("echo", image, "model:echo")
        status, body, _ = await stack.call("echo", PAYLOAD, timeout_s=120)
        if status != 200:
            raise RuntimeError(f"warm-up call: {status} {body}")
        await timed_calls(stack, "echo", 100)
        head = slow_head(f"{stack.customer_name}.localhost")
        for r in range(rounds):
            # Alternating order, so machine noise falls on both kinds of phase alike.
            for name in (("without", "with") if r % 2 == 0 else ("with", "without")):
                if name == "without":
                    phases[name].add(*await timed_calls(stack, "echo", per_round, min_s=phase_s))
                    continue
                async with SlowLoris("127.0.0.1", stack.port, connections, head, rng=random.Random(r)) as attack:
                    phases[name].add(*await timed_calls(stack, "echo", per_round, min_s=phase_s))
                slow.opened += attack.stats.opened
                slow.lifetimes_s += attack.stats.lifetimes_s
                slow.answered += attack.stats.answered
                slow.connect_errors += attack.stats.connect_errors
            log(f"round {r + 1}/{rounds}: p99 without {p99(phases['without'].latencies_ms):.2f} ms, "
                f"with {connections} slow connections {p99(phases['with'].latencies_ms):.2f} ms")

    quiet, loud = phases["without"].latencies_ms, phases["with"].latencies_ms
    lifetimes = summary(slow.lifetimes_s)
    result: dict[str, Any] = {
        "bench": "slowloris", "runtime": runtime, "slow_connections": connections,
        "header_timeout_s": header_timeout_s, "rounds": rounds, "calls": {"without": len(quiet), "with": len(loud)},
        "p50_ms": {"without": p50(quiet), "with": p50(loud)},
        "p99_ms": {"without": p99(quiet), "with": p99(loud)},
        "p50_ratio": p50(loud) / p50(quiet), "p99_ratio": p99(loud) / p99(quiet),
        "errors": {name: phase.errors for name, phase in phases.items()},
        "slow_opened": slow.opened, "slow_closed_by_server": len(slow.lifetimes_s),
        "slow_answered": slow.answered, "slow_connect_errors": slow.connect_errors,
        "slow_lifetime_s": lifetimes, "wall_s": time.perf_counter() - t_begin,
    }
    rows: list[list[Any]] = [["normal calls", "n", "p50 ms", "p90 ms", "p99 ms", "non-200"]]
    for name, label in (("without", "without slow connections"), ("with", f"with {connections} slow connections")):
        lat = phases[name].latencies_ms
        rows.append([label, len(lat), p50(lat), percentile(lat, 90), p99(lat), phases[name].errors])
    rows.append(["ratio (with / without)", "", result["p50_ratio"], "", result["p99_ratio"], ""])
    print(f"slowloris: runtime {runtime}, {connections} connections sending a head byte a second, "
          f"header deadline {header_timeout_s:g} s, {rounds} alternating rounds; slow connections opened "
          f"{slow.opened}, closed by the server {len(slow.lifetimes_s)} (lifetime p50 {lifetimes['p50']:.2f} s, "
          f"max {lifetimes['max']:.2f} s), answered {slow.answered}")
    report(rows, result)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.slowloris", description=__doc__.split("\n")[0])
    parser.add_argument("--runtime", choices=["docker", "process"], default=None,
                        help="default: docker when the engine answers, else process")
    parser.add_argument("--connections", type=int, default=200, help="slow connections kept open")
    parser.add_argument("--calls", type=int, default=500, help="normal calls per phase, at concurrency 1")
    parser.add_argument("--header-timeout-s", type=float, default=2.0,
                        help="the ingress's header deadline for this run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both phases")
    args = parser.parse_args(argv)
    runtime = args.runtime or default_runtime()
    run_async(bench(runtime, max(1, args.connections), max(1, args.calls), args.header_timeout_s,
                    max(1, args.rounds)))


if __name__ == "__main__":
    main()
