"""How fast a version scales out under a step of load, and back to zero when it stops.

``python -m loadtests.scale [--runtime docker|process] [--callers 8] [--seconds 10]``

A 50 ms model, one proxy. Each phase: 1 caller for a few seconds, then a step
to ``--callers`` concurrent callers for ``--seconds``, then nothing. Measured:

- the time from the step until the p99 of a 0.5 s window is back under 2× the
  model time (replicas were started meanwhile), and the replicas over time;
- the time from the last call until no replica runs (idle → lukewarm);
- the baseline, in the same run: the same step on a version held to one
  replica (``capacity.max`` 1): its p99 under the step is what not scaling costs.

Prints a table, then as the last line one JSON object (``"bench": "scale"``).
"""
from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from loadtests.common import BenchStack, bench_stack, default_runtime, log, p99, report, run_async

MODEL_S = 0.05
SOURCE = f"import time\n\ndef work(x):\n    time.sleep({MODEL_S})\n    return x\n"
WINDOW_S = 0.5


async def caller(stack: BenchStack, model: str, until: float, calls: list[tuple[float, float, int]]) -> None:
    while time.monotonic() < until:
        t = time.monotonic()
        status, _, _ = await stack.call(model, 1, timeout_s=60)
        calls.append((t, time.monotonic() - t, status))


async def replica_counts(stack: BenchStack, model: str) -> tuple[int, int]:
    """(running, all) replicas of ``model`` on the stack's proxies."""
    assert stack.session is not None
    running = total = 0
    for proxy in stack.proxies:
        for r in (await proxy.state(stack.session))["replicas"]:
            if f"/{model}/" in r["version"]:
                total += 1
                running += r["state"] == "running"
    return running, total


async def sample(stack: BenchStack, model: str, stop: asyncio.Event, out: list[tuple[float, int]]) -> None:
    while not stop.is_set():
        out.append((time.monotonic(), (await replica_counts(stack, model))[0]))
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except TimeoutError:
            pass


async def step(stack: BenchStack, model: str, callers: int, seconds: float) -> dict[str, Any]:
    calls: list[tuple[float, float, int]] = []
    replicas: list[tuple[float, int]] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample(stack, model, stop, replicas))
    t_warm = time.monotonic()
    await caller(stack, model, t_warm + 2.0, calls)
    t_step = time.monotonic()
    await asyncio.gather(*(caller(stack, model, t_step + seconds, calls) for _ in range(callers)))
    t_end = time.monotonic()
    stop.set()
    await sampler
    after = [(t, s) for t, s, _ in calls if t >= t_step]
    windows = []
    t = t_step
    while t < t_end:
        lat = [s for start, s in after if t <= start < t + WINDOW_S]
        if lat:
            windows.append((t - t_step, p99(lat)))
        t += WINDOW_S
    recover_s = next((w for w, v in windows if v < 2 * MODEL_S), float("nan"))
    settled = [s for start, s in after if start >= t_step + seconds / 2]
    return {"calls": len(calls), "errors": sum(1 for *_, st in calls if st != 200), "recover_s": recover_s,
            "p99_under_step_ms": p99([s for _, s in after]) * 1000, "p99_settled_ms": p99(settled) * 1000,
            "replicas_max": max((n for _, n in replicas), default=0),
            "replicas": [(round(t - t_step, 2), n) for t, n in replicas if t >= t_step][::4], "t_end": t_end}


async def idle_to_zero(stack: BenchStack, model: str, since: float, timeout_s: float = 120.0) -> float:
    while time.monotonic() - since < timeout_s:
        if (await replica_counts(stack, model))[0] == 0:
            return time.monotonic() - since
        await asyncio.sleep(0.1)
    return float("nan")


async def bench(runtime: str, callers: int, seconds: float) -> None:
    async with bench_stack(runtime=runtime, proxies=1, reaper_interval_s=0.2, pause_stop_after_s=3600,
                           max_replicas=callers + 4, max_replicas_per_customer=callers + 4) as stack:
        image = await asyncio.to_thread(stack.model, "scale", SOURCE)
        await stack.deploy("scaled", image, "model:work", idle_timeout_s=2.0,
                           capacity={"min": 0, "desired": 1, "max": callers})
        await stack.deploy("fixed", image, "model:work", idle_timeout_s=2.0,
                           capacity={"min": 0, "desired": 1, "max": 1})
        log(f"step 1 → {callers} callers for {seconds:g} s on a version that may scale to {callers}")
        scaled = await step(stack, "scaled", callers, seconds)
        zero_s = await idle_to_zero(stack, "scaled", scaled["t_end"])
        log("the same step on a version held to one replica")
        fixed = await step(stack, "fixed", callers, seconds)
    rows: list[list[Any]] = [["version", "calls", "errors", "replicas max", "recover s", "p99 under step ms",
                              "p99 settled ms"]]
    for name, r in (("scaled (max %d)" % callers, scaled), ("fixed (max 1)", fixed)):
        rows.append([name, r["calls"], r["errors"], r["replicas_max"], r["recover_s"], r["p99_under_step_ms"],
                     r["p99_settled_ms"]])
    print(f"replicas running over time after the step (s, n): {scaled['replicas']}")
    print(f"idle → no replica running: {zero_s:.2f} s (idle_timeout_s 2)")
    report(rows, {
        "bench": "scale", "runtime": runtime, "model_ms": MODEL_S * 1000, "callers": callers,
        "recover_s": scaled["recover_s"], "idle_to_zero_s": zero_s, "replicas_max": scaled["replicas_max"],
        "p99_settled_ms": {"scaled": scaled["p99_settled_ms"], "fixed": fixed["p99_settled_ms"]},
        "ratio": scaled["p99_settled_ms"] / fixed["p99_settled_ms"],
        "errors": scaled["errors"] + fixed["errors"],
    })


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.scale")
    parser.add_argument("--runtime", choices=["docker", "process"], default=None)
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    run_async(bench(args.runtime or default_runtime(), max(2, args.callers), max(2.0, args.seconds)))


if __name__ == "__main__":
    main()
