"""Chaos: a fixed request rate through two ingresses and three proxies while the fleet is broken.

``python -m loadtests.chaos [--runtime docker|process] [--seconds 60] [--rate 20] [--baseline-seconds 15]``

Starts a Sentinel-managed Redis (``loadtests/redis_ha.py``: primary, replica, three Sentinels),
three proxies on their own loopback addresses, two ingress processes, and an echo model kept on
two replicas. Callers spread the rate over both ingresses as a load balancer would (a refused
connection goes to the next). First a quiet baseline at the same rate, then ``--seconds`` of chaos:

- a proxy is killed (SIGKILL) and restarted, twice (two different proxies);
- the Redis primary is killed and the Sentinels fail over to the replica (it comes back as a replica);
- a model container (a replica process with ``--runtime process``) is killed.

Every call is classified (``loadtests/traffic.py``): ``ok`` (200 and the right answer), a clear
error (the contract's JSON error, ``Retry-After`` on 429/503), or ``lost`` — anything else, which
must be 0. The ratios compare the chaos phase with the baseline measured in the same run.

Prints a table, then as the last line one JSON object (``"bench": "chaos"``).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from loadtests.common import (
    BenchStack, IngressProcess, default_runtime, descendants, log, p50, p99, report, run_async,
    unmount_below,
)
from loadtests.redis_ha import redis_ha
from loadtests.traffic import Tally, Traffic

ECHO_SOURCE = "def echo(x):\n    return {'echo': x}\n"
PROXIES = 3
INGRESSES = 2


def kill_a_replica(stack: BenchStack, runtime: str) -> str:
    """SIGKILL one model replica (a container, or a harness process); what was killed."""
    for proxy in stack.proxies:
        if runtime == "docker":
            ids = subprocess.run(["docker", "ps", "-q", "--filter", f"label=lukewarm.proxy={proxy.proxy_id}"],
                                 capture_output=True, text=True, timeout=30).stdout.split()
            if ids:
                subprocess.run(["docker", "kill", ids[0]], capture_output=True, timeout=30)
                return f"container {ids[0][:12]} of {proxy.proxy_id}"
        elif proxy.pid is not None:
            children = [pid for pid, _ in descendants(proxy.pid) if pid != proxy.pid]
            if children:
                with contextlib.suppress(OSError):
                    os.kill(children[0], signal.SIGKILL)
                return f"replica process {children[0]} of {proxy.proxy_id}"
    return "no replica found"


async def chaos_schedule(stack: BenchStack, ha: Any, runtime: str, seconds: float,
                         events: list[tuple[float, str]]) -> None:
    """The faults, spread over the phase; each step's time and what it did go to ``events``."""
    t0 = time.monotonic()

    async def at(fraction: float, what: str, action: Callable[[], Awaitable[Any]]) -> None:
        delay = t0 + fraction * seconds - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)  # the schedule's pacing, not a synchronisation
        started = time.monotonic()
        detail = await action()
        events.append((round(started - t0, 2), f"{what}{f': {detail}' if detail else ''} "
                                                f"({time.monotonic() - started:.2f} s)"))
        log(f"chaos t={started - t0:.1f}s {what} {detail or ''}")

    async def kill(n: int) -> str:
        stack.proxies[n].kill()
        return stack.proxies[n].proxy_id

    async def restart(n: int) -> str:
        await stack.proxies[n].start()
        return stack.proxies[n].proxy_id

    async def failover() -> str:
        new = await ha.kill_primary(revive=True)
        return f"primary now on port {new}"

    async def container() -> str:
        return await asyncio.to_thread(kill_a_replica, stack, runtime)

    await at(0.10, "kill proxy", lambda: kill(0))
    await at(0.22, "restart proxy", lambda: restart(0))
    await at(0.35, "kill the Redis primary", failover)
    await at(0.55, "kill a model replica", container)
    await at(0.68, "kill proxy", lambda: kill(1))
    await at(0.80, "restart proxy", lambda: restart(1))


async def measure(traffic: Traffic, seconds: float) -> Tally:
    async with traffic:
        await asyncio.sleep(seconds)  # the phase's length: traffic runs meanwhile
    return traffic.tally


async def run(runtime: str, seconds: float, rate: float, baseline_s: float) -> dict[str, Any]:
    state_root = Path(tempfile.mkdtemp(prefix="lwc-", dir="/tmp"))
    async with contextlib.AsyncExitStack() as exits:
        exits.callback(shutil.rmtree, state_root, True)
        exits.callback(unmount_below, state_root)
        ha = await exits.enter_async_context(redis_ha())
        stack = BenchStack(ha.url, state_root, runtime)
        exits.push_async_callback(stack.teardown)
        for _ in range(PROXIES):
            await stack.add_proxy(stop_replicas_on_exit=True, heartbeat_interval_s=0.5, heartbeat_ttl_s=3)
        await stack.start_ingress(reconcile_interval_s=0)  # admin only; the traffic goes through two more
        await stack.wait_for_proxies(PROXIES)
        ingresses = [IngressProcess(ha.url, state_root, f"c{n}") for n in range(INGRESSES)]
        for ingress in ingresses:
            exits.callback(ingress.stop)
            await ingress.start()
        await stack.create_customer("chaos")
        image = stack.model("echo", ECHO_SOURCE)
        await stack.deploy("echo", image, "model:echo", capacity={"min": 2, "max": 3})

        def traffic() -> Traffic:
            return Traffic([i.url for i in ingresses], stack.call_headers(), "/v1/echo/latest",
                           lambda n: {"data": n, "timeout_seconds": 20}, callers=8, timeout_s=30, rate_per_s=rate,
                           expected=lambda n, body: body == {"data": {"echo": n}})

        log(f"baseline: {rate:g} calls/s for {baseline_s:g} s")
        baseline = await measure(traffic(), baseline_s)
        log(f"chaos: {rate:g} calls/s for {seconds:g} s")
        events: list[tuple[float, str]] = []
        chaos_traffic = traffic()
        async with chaos_traffic:
            await asyncio.gather(chaos_schedule(stack, ha, runtime, seconds, events),
                                 asyncio.sleep(seconds))
        chaos = chaos_traffic.tally
        if chaos.lost:
            log(f"lost examples: {chaos.lost_examples[:5]}")
        for when, what in events:
            log(f"  t={when:>5}s  {what}")

    def ok_fraction(t: Tally) -> float:
        return t.ok / t.sent if t.sent else 0.0

    result = {
        "bench": "chaos", "runtime": runtime, "seconds": seconds, "rate_per_s": rate,
        "sent": chaos.sent, "ok": chaos.ok, "clear_errors": chaos.clear_errors, "lost": chaos.lost,
        "errors": dict(chaos.errors), "lost_examples": chaos.lost_examples[:5],
        "events": [f"t={when}s {what}" for when, what in events],
        "ok_p50_ms": p50(chaos.ok_ms) if chaos.ok_ms else None, "ok_p99_ms": p99(chaos.ok_ms) if chaos.ok_ms else None,
        "baseline": {"sent": baseline.sent, "ok": baseline.ok, "clear_errors": baseline.clear_errors,
                     "lost": baseline.lost, "ok_p50_ms": p50(baseline.ok_ms) if baseline.ok_ms else None,
                     "ok_p99_ms": p99(baseline.ok_ms) if baseline.ok_ms else None},
        "ok_fraction_ratio": ok_fraction(chaos) / ok_fraction(baseline) if ok_fraction(baseline) else None,
        "p99_ratio": (p99(chaos.ok_ms) / p99(baseline.ok_ms)) if chaos.ok_ms and baseline.ok_ms else None,
    }
    rows: list[list[Any]] = [["phase", "sent", "ok", "clear errors", "lost", "ok p50 ms", "ok p99 ms"]]
    for name, t in (("baseline", baseline), ("chaos", chaos)):
        rows.append([name, t.sent, t.ok, t.clear_errors, t.lost, p50(t.ok_ms) if t.ok_ms else "-",
                     p99(t.ok_ms) if t.ok_ms else "-"])
    report(rows, result)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime", default=None, choices=("docker", "process"))
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=20.0, help="calls per second, in all")
    parser.add_argument("--baseline-seconds", type=float, default=15.0)
    args = parser.parse_args(argv)
    run_async(run(args.runtime or default_runtime(), args.seconds, args.rate, args.baseline_seconds))


if __name__ == "__main__":
    main()
