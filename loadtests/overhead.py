"""What Lukewarm adds on a warm call: through ingress + proxy vs. directly on the container's socket.

``python -m loadtests.overhead [--runtime docker|process] [--n 2000] [--concurrency 32]``

Deploys an echo model, warms it, then in one run and in alternating rounds
(so machine noise hits both paths alike) measures:

- latency at concurrency 1 over ``--n`` calls each: through the ingress (one
  aiohttp ClientSession, keep-alive) and direct on the replica's Unix socket
  (``HarnessClient``, the proxy's own adapter);
- throughput (rps) of both at ``--concurrency`` for ``--seconds`` each;
- CPU per call of each process (this one = client + in-process ingress, the
  proxy, the harness), from /proc, to show where the added time goes.

Prints a table, then as the last line one JSON object (``"bench": "overhead"``).
"""
from __future__ import annotations

import argparse
import asyncio
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson

from loadtests.common import (BenchStack, bench_stack, cpu_seconds, default_runtime, descendants, log, p50, p99,
                              report, run_async)
from runtime_proxy.harness_client import HarnessClient

ECHO_SOURCE = "def echo(x):\n    return x\n"
PAYLOAD: dict[str, Any] = {"text": "hello world", "n": 42, "values": [1.5, 2.5, 3.5]}

Call = Callable[[], Awaitable[None]]


# ---- CPU accounting from /proc ---------------------------------------------------------


def tree(root: int) -> list[int]:
    return [pid for pid, _ in descendants(root)]


def harness_pids(stack: BenchStack, proxy_pid: int) -> list[int]:
    """The harness process tree: the container's (docker) or the proxy's children (process)."""
    if stack.runtime == "docker":
        label = f"label=lukewarm.proxy={stack.proxies[0].proxy_id}"
        ids = subprocess.run(["docker", "ps", "-q", "--filter", label], capture_output=True, text=True,
                             timeout=30).stdout.split()
        pids: list[int] = []
        for cid in ids:
            out = subprocess.run(["docker", "inspect", "-f", "{{.State.Pid}}", cid], capture_output=True,
                                 text=True, timeout=30).stdout.strip()
            if out.isdigit() and int(out) > 0:
                pids.extend(tree(int(out)))
        return pids
    return [p for p in tree(proxy_pid) if p != proxy_pid]


class CpuMeter:
    """CPU seconds per process group, accumulated over the phases it brackets."""

    def __init__(self, groups: dict[str, Callable[[], float]]) -> None:
        self.groups = groups
        self.totals: dict[str, dict[str, float]] = {}

    def measure(self, phase: str) -> _Bracket:
        return _Bracket(self, phase)


class _Bracket:
    def __init__(self, meter: CpuMeter, phase: str) -> None:
        self.meter, self.phase = meter, phase

    def __enter__(self) -> None:
        self.start = {k: f() for k, f in self.meter.groups.items()}

    def __exit__(self, *exc: object) -> None:
        acc = self.meter.totals.setdefault(self.phase, {k: 0.0 for k in self.meter.groups})
        for k, f in self.meter.groups.items():
            acc[k] += f() - self.start[k]


# ---- the two paths -------------------------------------------------------------------------


def through_call(stack: BenchStack, session: aiohttp.ClientSession, model: str,
                 errors: list[str]) -> Call:
    url = f"{stack.url}/v1/{model}/latest"
    body = orjson.dumps({"data": PAYLOAD})
    headers = stack.call_headers()
    timeout = aiohttp.ClientTimeout(total=30)

    async def call() -> None:
        async with session.post(url, data=body, headers=headers, timeout=timeout) as resp:
            raw = await resp.read()
            if resp.status != 200:
                errors.append(f"{resp.status} {raw[:200]!r}")
                return
            if orjson.loads(raw)["data"] != PAYLOAD:
                errors.append("wrong output")

    return call


def direct_call(client: HarnessClient, errors: list[str]) -> Call:
    payload = {"inputs": [PAYLOAD]}

    async def call() -> None:
        status, body = await asyncio.wait_for(client.call("POST", "/predict", payload), 30)
        if status != 200 or body.get("outputs") != [PAYLOAD]:
            errors.append(f"{status} {str(body)[:200]}")

    return call


async def latencies(call: Call, n: int) -> list[float]:
    out = []
    clock = time.perf_counter
    for _ in range(n):
        t = clock()
        await call()
        out.append((clock() - t) * 1000)
    return out


async def throughput(call: Call, concurrency: int, seconds: float) -> tuple[int, float]:
    """Completed calls and elapsed seconds with ``concurrency`` workers for ``seconds``."""
    stop_at = time.perf_counter() + seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await call()
            done += 1

    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), seconds + 60)
    return done, time.perf_counter() - t0


# ---- the benchmark ---------------------------------------------------------------------------


async def bench(runtime: str, n: int, concurrency: int, rounds: int, seconds: float) -> None:
    t_begin = time.perf_counter()
    log(f"starting a stack (runtime {runtime})")
    async with bench_stack(runtime=runtime, proxies=1, replica_concurrency=1) as stack:
        image = await asyncio.to_thread(stack.model, "echo", ECHO_SOURCE)
        await stack.deploy("echo", image, entrypoint="model:echo")
        t = time.perf_counter()
        status, body, headers = await stack.call("echo", PAYLOAD, timeout_s=60)
        if status != 200 or body != {"data": PAYLOAD}:
            raise RuntimeError(f"first call failed: {status} {body}")
        cold_ms = (time.perf_counter() - t) * 1000
        log(f"first (cold) call {cold_ms:.0f} ms; {headers.get('Server-Timing')}")
        _, replica_id, sock = (await stack.replica_sockets())[0]
        log(f"replica {replica_id}: socket {sock}")

        errors: list[str] = []
        proxy_pid = stack.proxies[0].pid
        assert proxy_pid is not None
        hpids = await asyncio.to_thread(harness_pids, stack, proxy_pid)
        meter = CpuMeter({
            "bench+ingress": lambda: time.process_time(),
            "proxy": lambda: cpu_seconds([proxy_pid]),
            "harness": lambda: cpu_seconds(hpids),
        })
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            client = HarnessClient(str(sock), max_idle=max(concurrency, 4))
            paths = {"through": through_call(stack, session, "echo", errors),
                     "direct": direct_call(client, errors)}
            try:
                # Warm both paths (connections, caches, the proxy's cost book).
                for name, call in paths.items():
                    await latencies(call, 200)
                    await throughput(call, concurrency, 0.3)
                lat: dict[str, list[float]] = {"through": [], "direct": []}
                served: dict[str, list[float]] = {"through": [0, 0.0], "direct": [0, 0.0]}
                per_round = max(1, n // rounds)
                for r in range(rounds):
                    order = ["through", "direct"] if r % 2 == 0 else ["direct", "through"]
                    for name in order:
                        with meter.measure(f"lat-{name}"):
                            lat[name] += await latencies(paths[name], per_round)
                    for name in order:
                        with meter.measure(f"rps-{name}"):
                            done, elapsed = await throughput(paths[name], concurrency, seconds / rounds)
                        served[name][0] += done
                        served[name][1] += elapsed
                    log(f"round {r + 1}/{rounds}: through p50 {p50(lat['through']):.3f} ms, "
                        f"direct p50 {p50(lat['direct']):.3f} ms")
            finally:
                client.close()
        if errors:
            log(f"{len(errors)} failed calls, first: {errors[0]}")

    through_rps = served["through"][0] / served["through"][1]
    direct_rps = served["direct"][0] / served["direct"][1]
    result: dict[str, Any] = {
        "bench": "overhead", "runtime": runtime, "n": len(lat["through"]),
        "through_p50_ms": p50(lat["through"]), "through_p99_ms": p99(lat["through"]),
        "direct_p50_ms": p50(lat["direct"]), "direct_p99_ms": p99(lat["direct"]),
        "added_p50_ms": p50(lat["through"]) - p50(lat["direct"]),
        "added_p99_ms": p99(lat["through"]) - p99(lat["direct"]),
        "through_rps": through_rps, "direct_rps": direct_rps, "rps_ratio": through_rps / direct_rps,
        "concurrency": concurrency, "errors": len(errors), "cold_call_ms": cold_ms,
    }
    cpu_us: dict[str, dict[str, float]] = {}
    for phase, acc in meter.totals.items():
        kind, name = phase.split("-", 1)
        calls = len(lat[name]) if kind == "lat" else served[name][0]
        cpu_us[phase] = {k: v / max(calls, 1) * 1e6 for k, v in acc.items()}
    result["cpu_us_per_call"] = cpu_us
    result["wall_s"] = time.perf_counter() - t_begin

    rows: list[list[Any]] = [["path", "p50 ms", "p99 ms", f"rps @c={concurrency}",
                              "cpu µs/call bench+ingress", "proxy", "harness"]]
    for name in ("through", "direct"):
        c = cpu_us.get(f"lat-{name}", {})
        rows.append([name, p50(lat[name]), p99(lat[name]), served[name][0] / served[name][1],
                     c.get("bench+ingress", 0.0), c.get("proxy", 0.0), c.get("harness", 0.0)])
    rows.append(["added / ratio", result["added_p50_ms"], result["added_p99_ms"], result["rps_ratio"], "", "", ""])
    print(f"overhead: runtime {runtime}, n={len(lat['through'])} per path, {rounds} alternating rounds, "
          f"errors {len(errors)}")
    report(rows, result)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--runtime", choices=["docker", "process"], default=None,
                        help="default: docker when the engine answers, else process")
    parser.add_argument("--n", type=int, default=2000, help="calls per path at concurrency 1")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8.0, help="throughput time per path, over all rounds")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    runtime = args.runtime or default_runtime()
    run_async(bench(runtime, args.n, args.concurrency, max(1, args.rounds), args.seconds))


if __name__ == "__main__":
    main()
