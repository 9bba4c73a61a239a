"""How a big batch speeds up with more proxies: the ingress splits it across them by expected cost.

``python -m loadtests.batch_scale [--items 1000] [--reps 3] [--sleep-ms 5] [--proxies 1,2,4]``

A sleep-bound model (``time.sleep`` per item; deployed without batch_size,
so each item is one call) and a batch ``{"data": [[i, i], ...]}`` through the
ingress, with 1, then 2, then 4 proxy processes on this machine sharing one
Docker engine. Before timing each size every proxy is warmed (a batch is sent
until each proxy has a running replica of the version, checked on the
proxies and in ``GET /api/v1/status``). Then ``--reps`` batches are timed;
``speedup[n] = t1 / tn`` (medians). The ideal is n; the target ≥ 0.8·n.

The split of every timed batch is recorded (chunk size, proxy, seconds per
chunk: the in-process ingress's dispatcher is observed, not changed) and the
ingress's request log is read back to show which proxies served each request.

Prints a table, then as the last line one JSON object (``"bench": "batch_scale"``).
"""
from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson

from loadtests.common import BenchStack, bench_stack, default_runtime, log, p50, report, run_async, wait_until

TIMEOUT_S = 120.0
WARM_TRIES = 4


def sleep_source(sleep_ms: float) -> str:
    return f"import time\n\ndef predict(x):\n    time.sleep({sleep_ms / 1000!r})\n    return x\n"


class ChunkRecorder:
    """Wraps the in-process dispatcher's ``_run_chunk`` to record each chunk's proxy, size and time."""

    def __init__(self, stack: BenchStack) -> None:
        from ingress import state as ingress_state

        self.dispatcher = stack.app[ingress_state.DISPATCHER]
        self.chunks: list[dict[str, Any]] = []
        inner = self.dispatcher._run_chunk

        async def recorded(spec: Any, inputs: list[Any], choice: Any, deadline: float, request_id: str,
                           **options: Any) -> Any:
            t = time.perf_counter()
            planned = {"proxy": choice.proxy.proxy_id, "tier": choice.tier, "expected_ms": choice.expected_ms}
            result = await inner(spec, inputs, choice, deadline, request_id, **options)
            self.chunks.append({**planned, "request_id": request_id, "items": len(inputs),
                                "ran_on": result.proxy_id, "s": time.perf_counter() - t,
                                "infer_s": result.timings.get("infer_ms", 0.0) / 1000, "start": result.start})
            return result

        self.dispatcher._run_chunk = recorded

    def of(self, request_id: str) -> list[dict[str, Any]]:
        return [c for c in self.chunks if c["request_id"] == request_id]


async def send_batch(stack: BenchStack, model: str, version: int, items: int) -> tuple[float, str, str]:
    """Seconds, request id and Server-Timing of one batch; raises unless all outputs came back in order."""
    data = [[i, i] for i in range(items)]
    request_id = uuid.uuid4().hex
    assert stack.session is not None
    headers = {**stack.call_headers(), "X-Request-Id": request_id}
    t = time.perf_counter()
    async with stack.session.post(f"{stack.url}/v1/{model}/{version}", data=orjson.dumps({"data": data}),
                                  headers=headers, timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as resp:
        raw = await resp.read()
        elapsed = time.perf_counter() - t
        if resp.status != 200:
            raise RuntimeError(f"batch failed: {resp.status} {raw[:300]!r}")
        if orjson.loads(raw)["data"] != data:
            raise RuntimeError("batch answered wrong or reordered outputs")
        return elapsed, request_id, resp.headers.get("Server-Timing", "")


async def warm_proxies(stack: BenchStack, model: str, version: int, items: int) -> None:
    """Send batches until every proxy has a running replica of the version (bounded), as the ingress sees it."""
    assert stack.session is not None
    key = f"{stack.customer_name}/{model}/main/{version}"

    async def all_warm() -> bool:
        for proxy in stack.proxies:
            replicas = (await proxy.state(stack.session))["replicas"]  # type: ignore[arg-type]
            if not any(r["version"] == key and r["state"] == "running" for r in replicas):
                return False
        return True

    for attempt in range(WARM_TRIES):
        seconds, _, timing = await send_batch(stack, model, version, items)
        log(f"  warm-up batch {attempt + 1}: {seconds:.2f} s ({timing})")
        if await all_warm():
            break
    else:
        raise RuntimeError(f"not every proxy got a running replica after {WARM_TRIES} warm-up batches")

    # The ingress routes on heartbeats: wait until GET /api/v1/status shows every replica running, idle.
    ids = {p.proxy_id for p in stack.proxies}

    async def status_warm() -> bool:
        status, body = await stack.admin("GET", "/api/v1/status")
        if status != 200:
            return False
        seen = {p["proxy_id"] for p in body["proxies"] if p["proxy_id"] in ids and any(
            r["version"] == key and r["state"] == "running" and r.get("in_flight", 0) == 0
            for r in p.get("replicas") or ())}
        return seen == ids

    await wait_until(status_warm, 10.0, "every proxy's replica running and idle in /api/v1/status", 0.1)
    await asyncio.sleep(0.5)  # one more view poll: the ingress's local view catches up with Redis


async def request_proxies(stack: BenchStack, model: str, request_ids: Sequence[str]) -> dict[str, list[str]]:
    """``proxies`` per request, from the ingress's request log."""
    status, body = await stack.admin(
        "GET", f"/api/v1/customers/{stack.customer_name}/models/{model}/branches/main/logs?limit=200")
    if status != 200:
        return {}
    wanted = set(request_ids)
    return {r["request_id"]: r.get("proxies", []) for r in body.get("logs", []) if r.get("request_id") in wanted}


async def bench(items: int, reps: int, sleep_ms: float, sizes: list[int]) -> None:
    t_begin = time.perf_counter()
    runtime = default_runtime()
    tag = uuid.uuid4().hex[:6]
    image = ""
    seconds: dict[str, float] = {}
    per_size: dict[int, list[dict[str, Any]]] = {}
    logged: dict[str, list[str]] = {}
    log(f"starting a stack ({runtime}, {sizes[0]} prox{'y' if sizes[0] == 1 else 'ies'})")
    try:
        async with bench_stack(runtime=runtime, proxies=sizes[0]) as stack:
            image = await asyncio.to_thread(stack.model, f"bscale-{tag}", sleep_source(sleep_ms))
            version = await stack.deploy("sleepy", image, "model:predict", timeout_s=TIMEOUT_S)
            recorder = ChunkRecorder(stack)
            for n in sizes:
                while len(stack.proxies) < n:
                    await stack.add_proxy()
                await stack.wait_for_proxies(n)
                log(f"{n} prox{'y' if n == 1 else 'ies'}: warming")
                await warm_proxies(stack, "sleepy", version, items)
                times: list[float] = []
                requests: list[dict[str, Any]] = []
                for rep in range(reps):
                    elapsed, request_id, timing = await send_batch(stack, "sleepy", version, items)
                    times.append(elapsed)
                    chunks = recorder.of(request_id)
                    requests.append({"request_id": request_id, "s": elapsed, "timing": timing, "chunks": chunks})
                    log(f"  rep {rep + 1}: {elapsed:.3f} s; chunks " + ", ".join(
                        f"{c['ran_on'].split('-')[0]}:{c['items']} items {c['s']:.2f}s ({c['tier']}, "
                        f"exp {c['expected_ms']:.0f} ms)" for c in chunks))
                    await asyncio.sleep(0.7)  # heartbeats settle: in_flight back to 0 in the view
                seconds[str(n)] = p50(times)
                per_size[n] = requests
            logged = await request_proxies(stack, "sleepy",
                                           [r["request_id"] for rs in per_size.values() for r in rs])
    finally:
        if image and runtime == "docker":
            import docker

            dk = docker.from_env(timeout=30)
            try:
                await asyncio.to_thread(dk.images.remove, image)
            except docker.errors.DockerException as exc:
                log(f"could not remove image {image}: {exc}")
            finally:
                dk.close()

    base = seconds[str(sizes[0])] * sizes[0]  # t1 when the first size is 1
    speedup = {str(n): base / seconds[str(n)] for n in sizes}
    ideal_s = items * sleep_ms / 1000
    rows: list[list[Any]] = [["proxies", "p50 s", "speedup", "target", "efficiency", "chunk sizes (median rep)",
                              "slowest chunk s", "proxies in request log"]]
    detail: dict[str, Any] = {}
    for n in sizes:
        reqs = sorted(per_size[n], key=lambda r: r["s"])
        mid = reqs[len(reqs) // 2]
        sizes_mid = sorted(c["items"] for c in mid["chunks"])
        slowest = max((c["s"] for c in mid["chunks"]), default=float("nan"))
        rows.append([n, seconds[str(n)], speedup[str(n)], 0.8 * n, speedup[str(n)] / n,
                     "/".join(map(str, sizes_mid)), slowest, len(set(logged.get(mid["request_id"], [])))])
        detail[str(n)] = {
            "chunk_items": sizes_mid, "slowest_chunk_s": slowest,
            "chunk_infer_s": sorted(round(c["infer_s"], 3) for c in mid["chunks"]),
            "tiers": sorted(c["tier"] for c in mid["chunks"]),
            "proxies_logged": logged.get(mid["request_id"], []),
        }
    result: dict[str, Any] = {
        "bench": "batch_scale", "runtime": runtime, "items": items, "sleep_ms": sleep_ms, "reps": reps,
        "seconds": seconds, "speedup": speedup, "target": "≥ 0.8·N",
        "meets_target": all(speedup[str(n)] >= 0.8 * n for n in sizes),
        "ideal_1_proxy_s": ideal_s, "detail": detail, "wall_s": time.perf_counter() - t_begin,
    }
    print(f"batch_scale: {runtime}, {items} items × {sleep_ms} ms sleep, {reps} timed reps per size")
    report(rows, result)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.batch_scale", description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sleep-ms", type=float, default=5.0)
    parser.add_argument("--proxies", default="1,2,4", help="proxy counts, ascending, first should be 1")
    args = parser.parse_args(argv)
    sizes = sorted({int(x) for x in args.proxies.split(",") if x.strip()})
    run_async(bench(max(1, args.items), max(1, args.reps), args.sleep_ms, sizes))


if __name__ == "__main__":
    main()
