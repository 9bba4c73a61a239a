"""What Lukewarm adds on a warm call: through ingress + proxy vs. directly on the container's socket.

``python -m loadtests.overhead [--runtime docker|process] [--n 2000] [--concurrency 32] [--no-process]
[--wrk-seconds 5]``

Deploys an echo model, warms it, then in one run and in alternating rounds
(so machine noise hits every path alike) measures:

- latency at concurrency 1 over ``--n`` calls each: through the ingress (one
  aiohttp ClientSession, keep-alive) and direct on the replica's Unix socket
  (``HarnessClient``, the proxy's own adapter);
- the same through an ingress in its own process (``python -m ingress``, as in
  production; ``--no-process`` skips it): ``process`` in the JSON, with its own
  ``added_p50_ms``, ``added_p99_ms`` and ``rps_ratio`` against the same direct runs;
- throughput (rps) of each at ``--concurrency`` for ``--seconds`` each;
- CPU per call of each process (this one = client + in-process ingress, the
  ingress process, the proxy, the harness), from /proc, to show where the added time goes;
- when ``wrk`` is on PATH: ``wrk`` against the ingress process at concurrency 1 and
  ``--concurrency`` (``wrk`` in the JSON: its own latency histogram, no Python client in the way);
- the floor under any design with two daemons in the path: the direct client through two processes
  that only copy bytes (``loadtests.relay``) in front of the same socket, in the same rounds
  (``relays`` in the JSON, with its own ``added_p50_ms``, ``added_p99_ms`` and ``rps_ratio``).

The headline keys (``added_p50_ms``, ``added_p99_ms``, ``rps_ratio``) stay the in-process ingress's.
Prints a table, then as the last line one JSON object (``"bench": "overhead"``).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson

from loadtests.common import (BenchStack, IngressProcess, bench_stack, cpu_seconds, default_runtime, descendants,
                              log, p50, p99, report, run_async)
from loadtests.relay import relay_chain
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
                 errors: list[str], base_url: str | None = None) -> Call:
    url = f"{base_url or stack.url}/v1/{model}/latest"
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


# ---- wrk (a C client: the latency it sees is the server side's alone) ---------------------------

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = os.getenv("LW_BODY")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = os.getenv("LW_KEY")
wrk.headers["Host"] = os.getenv("LW_HOST")
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("LWRESULT %f %f %f %f %d %d %d\\n", latency:percentile(50), latency:percentile(99),
    latency:percentile(99.9), latency.max, summary.requests, e.connect + e.read + e.write + e.timeout + e.status,
    summary.duration))
end
"""


async def run_wrk(url: str, stack: BenchStack, connections: int, seconds: float) -> dict[str, float]:
    """``wrk`` POSTing the echo payload to ``url`` for ``seconds`` with ``connections`` connections."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT)
    try:
        env = {**os.environ, "LW_BODY": orjson.dumps({"data": PAYLOAD}).decode(), "LW_KEY": stack.key,
               "LW_HOST": f"{stack.customer_name}.localhost"}
        proc = await asyncio.create_subprocess_exec(
            "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "-s", f.name, url, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), seconds + 60)
    finally:
        os.unlink(f.name)
    line = next((ln for ln in out.decode().splitlines() if ln.startswith("LWRESULT")), "")
    if not line:
        raise RuntimeError(f"wrk gave no result: {out.decode()[-500:]} {err.decode()[-500:]}")
    p50_us, p99_us, p999_us, max_us, requests, errors, duration_us = (float(x) for x in line.split()[1:])
    return {"p50_ms": p50_us / 1000, "p99_ms": p99_us / 1000, "p999_ms": p999_us / 1000, "max_ms": max_us / 1000,
            "rps": requests / (duration_us / 1e6), "errors": errors, "connections": connections}


# ---- the benchmark ---------------------------------------------------------------------------


async def bench(runtime: str, n: int, concurrency: int, rounds: int, seconds: float, process: bool = True,
                wrk_seconds: float = 5.0) -> None:
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

        ingress: IngressProcess | None = None
        if process:
            ingress = IngressProcess(stack.redis_url, stack.state_root, "bench")
            await ingress.start()
            log(f"ingress process {ingress.proc.pid if ingress.proc else '?'} on {ingress.url}")
        try:
            async with relay_chain(str(sock)) as relays:
                result = await _measure(stack, ingress, relays, n, concurrency, rounds, seconds, wrk_seconds)
        finally:
            if ingress is not None:
                ingress.stop()
    result.update({"runtime": runtime, "cold_call_ms": cold_ms, "wall_s": time.perf_counter() - t_begin})
    _report(result, concurrency, rounds)


async def _measure(stack: BenchStack, ingress: IngressProcess | None, relays: tuple[str, list[int]], n: int,
                   concurrency: int, rounds: int, seconds: float, wrk_seconds: float) -> dict[str, Any]:
    _, _, sock = (await stack.replica_sockets())[0]
    errors: list[str] = []
    proxy_pid = stack.proxies[0].pid
    assert proxy_pid is not None
    hpids = await asyncio.to_thread(harness_pids, stack, proxy_pid)
    groups: dict[str, Callable[[], float]] = {
        "bench+ingress": lambda: time.process_time(),
        "proxy": lambda: cpu_seconds([proxy_pid]),
        "harness": lambda: cpu_seconds(hpids),
        "relays": lambda: cpu_seconds(relays[1]),
    }
    if ingress is not None and ingress.proc is not None:
        ingress_pid = ingress.proc.pid
        groups["ingress-process"] = lambda: cpu_seconds([ingress_pid])
    meter = CpuMeter(groups)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        client = HarnessClient(str(sock), max_idle=max(concurrency, 4))
        relayed = HarnessClient(relays[0], max_idle=max(concurrency, 4))
        paths = {"through": through_call(stack, session, "echo", errors), "direct": direct_call(client, errors),
                 "relays": direct_call(relayed, errors)}
        if ingress is not None:
            paths["process"] = through_call(stack, session, "echo", errors, base_url=ingress.url)
        lat: dict[str, list[float]] = {name: [] for name in paths}
        served: dict[str, list[float]] = {name: [0, 0.0] for name in paths}
        try:
            # Warm every path (connections, caches, the proxy's cost book).
            for call in paths.values():
                await latencies(call, 200)
                await throughput(call, concurrency, 0.3)
            per_round = max(1, n // rounds)
            names = list(paths)
            for r in range(rounds):
                order = names[r % len(names):] + names[:r % len(names)]  # each path leads in turn
                for name in order:
                    with meter.measure(f"lat-{name}"):
                        lat[name] += await latencies(paths[name], per_round)
                for name in order:
                    with meter.measure(f"rps-{name}"):
                        done, elapsed = await throughput(paths[name], concurrency, seconds / rounds)
                    served[name][0] += done
                    served[name][1] += elapsed
                log(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} p50 {p50(v):.3f} ms" for k, v in lat.items()))
        finally:
            client.close()
            relayed.close()
    wrk: dict[str, Any] = {}
    if ingress is not None and shutil.which("wrk") and wrk_seconds > 0:
        for connections in (1, concurrency):
            with meter.measure(f"wrk-c{connections}"):
                wrk[f"c{connections}"] = await run_wrk(f"{ingress.url}/v1/echo/latest", stack, connections,
                                                       wrk_seconds)
            log(f"wrk c={connections}: {wrk[f'c{connections}']}")
    if errors:
        log(f"{len(errors)} failed calls, first: {errors[0]}")

    rps = {name: served[name][0] / served[name][1] for name in paths}

    def against_direct(name: str) -> dict[str, float]:
        """A path's latency and throughput, and what it adds over the direct path's in the same rounds."""
        return {"through_p50_ms": p50(lat[name]), "through_p99_ms": p99(lat[name]),
                "added_p50_ms": p50(lat[name]) - p50(lat["direct"]),
                "added_p99_ms": p99(lat[name]) - p99(lat["direct"]),
                "through_rps": rps[name], "rps_ratio": rps[name] / rps["direct"]}

    result: dict[str, Any] = {
        "bench": "overhead", "n": len(lat["through"]), **against_direct("through"),
        "direct_p50_ms": p50(lat["direct"]), "direct_p99_ms": p99(lat["direct"]), "direct_rps": rps["direct"],
        "concurrency": concurrency, "errors": len(errors), "relays": against_direct("relays"),
    }
    if "process" in paths:
        result["process"] = against_direct("process")
    if wrk:
        result["wrk"] = wrk
    cpu_us: dict[str, dict[str, float]] = {}
    for phase, acc in meter.totals.items():
        kind, name = phase.split("-", 1)
        if kind == "wrk":
            calls = wrk[name]["rps"] * wrk_seconds
        else:
            calls = len(lat[name]) if kind == "lat" else served[name][0]
        cpu_us[phase] = {k: v / max(calls, 1) * 1e6 for k, v in acc.items()}
    result["cpu_us_per_call"] = cpu_us
    result["_lat"], result["_rps"] = lat, rps
    return result


def _report(result: dict[str, Any], concurrency: int, rounds: int) -> None:
    lat: dict[str, list[float]] = result.pop("_lat")
    rps: dict[str, float] = result.pop("_rps")
    cpu_us = result["cpu_us_per_call"]
    rows: list[list[Any]] = [["path", "p50 ms", "p99 ms", f"rps @c={concurrency}",
                              "cpu µs/call bench+ingress", "ingress process", "proxy", "harness", "relays"]]
    for name in lat:
        c = cpu_us.get(f"lat-{name}", {})
        rows.append([name, p50(lat[name]), p99(lat[name]), rps[name], c.get("bench+ingress", 0.0),
                     c.get("ingress-process", 0.0), c.get("proxy", 0.0), c.get("harness", 0.0),
                     c.get("relays", 0.0)])
    blank = [""] * 5
    for label, key in (("added / ratio", None), ("added / ratio (process)", "process"),
                       ("added / ratio (two bare relays)", "relays")):
        figures = result if key is None else result.get(key)
        if figures is not None:
            rows.append([label, figures["added_p50_ms"], figures["added_p99_ms"], figures["rps_ratio"], *blank])
    for name, w in result.get("wrk", {}).items():
        rows.append([f"wrk {name} (process)", w["p50_ms"], w["p99_ms"], w["rps"], *blank])
    print(f"overhead: runtime {result['runtime']}, n={len(lat['through'])} per path, {rounds} rounds, "
          f"errors {result['errors']}")
    report(rows, result)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--runtime", choices=["docker", "process"], default=None,
                        help="default: docker when the engine answers, else process")
    parser.add_argument("--n", type=int, default=2000, help="calls per path at concurrency 1")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8.0, help="throughput time per path, over all rounds")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--no-process", action="store_true",
                        help="skip the ingress in its own process (python -m ingress)")
    parser.add_argument("--wrk-seconds", type=float, default=5.0,
                        help="wrk time per concurrency against the ingress process (when wrk is on PATH; 0: skip)")
    args = parser.parse_args(argv)
    runtime = args.runtime or default_runtime()
    run_async(bench(runtime, args.n, args.concurrency, max(1, args.rounds), args.seconds,
                    process=not args.no_process, wrk_seconds=args.wrk_seconds))


if __name__ == "__main__":
    main()
