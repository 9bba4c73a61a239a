"""What a start costs through Lukewarm vs. the same step done raw on the Docker engine.

``python -m loadtests.starts [--rounds 10] [--warm-n 200]``

One stack (own Redis, one proxy with a fast reaper, the ingress), one tiny
echo image built here, and in ``--rounds`` alternating rounds (the order of
the two paths flips every round, so machine noise hits both alike):

- **lukewarm**: a version deployed with a tiny ``idle_timeout_s`` whose replica
  the proxy's reaper has paused (the proxy freezes the cgroup itself; waited for,
  bounded, via the kernel's freezer state and the proxy's own state) → time of
  the first answer through ingress + proxy, whose thaw is one write to the freezer. Baseline: a container created here with the proxy's own
  ``container_options`` (same image, hardening, mounts, harness), paused, then
  raw ``docker unpause`` (SDK) → first answer on its socket (``HarnessClient``).
- **cold**: a fresh version each round (so no replica exists), local image →
  time of the first answer through ingress + proxy. Baseline: raw create +
  start + poll ``/ready`` on the socket (the proxy's back-off) + first answer.
- **warm**: p50 of ``--warm-n`` calls through the ingress to a running replica
  (and, for reference, direct on its socket).

Prints a table, then as the last line one JSON object (``"bench": "starts"``).
Everything started here is removed: containers by this run's proxy ids (the
stack's proxy and the raw baseline's own ``lukewarm.proxy`` label), the image
tag built here, the proxy, the Redis.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from pathlib import Path
from typing import Any

import docker

from loadtests.common import (BenchStack, bench_stack, default_runtime, log, p50, p99, remove_containers, report,
                              run_async, wait_until)
from runtime_proxy import freezer
from runtime_proxy.daemon import install_harness
from runtime_proxy.docker_runtime import container_options
from runtime_proxy.harness_client import HarnessClient, HarnessUnavailable
from runtime_proxy.replicas import CONTAINER_UID
from runtime_proxy.runtime import SOCKET_NAME, LaunchSpec
from shared.messages import VersionSpec

ECHO_SOURCE = "def echo(x):\n    return x\n"
ENTRYPOINT = "model:echo"
PAYLOAD: dict[str, Any] = {"text": "hello", "n": 1}
LUKEWARM_IDLE_S = 0.2   # the lukewarm version's idle timeout: paused 0.2 s after each answer
REAPER_INTERVAL_S = 0.05
PAUSE_WAIT_S = 10.0     # bound on waiting for the reaper to pause the replica
CALL_TIMEOUT_S = 60.0


# ---- Server-Timing ---------------------------------------------------------------------


def server_timing(header: str | None) -> dict[str, Any]:
    """``{"start": desc, "<name>": dur_ms, ...}`` from the ingress's Server-Timing header."""
    out: dict[str, Any] = {}
    for part in (header or "").split(","):
        fields = [f.strip() for f in part.split(";")]
        if not fields or not fields[0]:
            continue
        name = fields[0]
        for f in fields[1:]:
            key, _, value = f.partition("=")
            if key == "dur":
                out[name] = float(value)
            elif key == "desc" and name == "start":
                out["start_kind"] = value.strip('"')
    return out


# ---- the raw baseline: a container of our own, same options as the proxy's ---------------


class RawContainers:
    """Containers created here with ``container_options`` under our own ``lukewarm.proxy`` label."""

    def __init__(self, root: Path, image: str, tag: str) -> None:
        self.root = root
        self.proxy_id = f"lwraw-{tag}"  # no proxy has this id: nothing adopts these containers
        self.harness = install_harness(root)
        self.spec = VersionSpec(customer="bench", model="raw", branch="main", version=1, image=image,
                                entrypoint=ENTRYPOINT)
        self.docker = docker.from_env(timeout=30)

    def close(self) -> None:
        remove_containers(f"lukewarm.proxy={self.proxy_id}")
        self.docker.close()

    async def create(self) -> tuple[str, Path]:
        replica_id = uuid.uuid4().hex[:12]
        run_dir = self.root / "run" / replica_id
        run_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(run_dir, CONTAINER_UID, CONTAINER_UID)  # as the proxy does: the harness runs as nobody
        launch = LaunchSpec(replica_id=replica_id, spec=self.spec, proxy_id=self.proxy_id, run_dir=run_dir,
                            harness_path=self.harness)
        container = await asyncio.to_thread(self.docker.containers.create, **container_options(launch))
        return str(container.id), run_dir / SOCKET_NAME

    async def start(self, cid: str) -> None:
        await asyncio.to_thread(self.docker.api.start, cid)

    async def pause(self, cid: str) -> None:
        await asyncio.to_thread(self.docker.api.pause, cid)

    async def unpause(self, cid: str) -> None:
        await asyncio.to_thread(self.docker.api.unpause, cid)

    async def remove(self, cid: str) -> None:
        await asyncio.to_thread(self.docker.api.remove_container, cid, force=True)

    async def wait_ready(self, client: HarnessClient, timeout_s: float = 60.0) -> None:
        """The proxy's own /ready poll: 5 ms, ×1.5, capped at 50 ms."""
        deadline = time.monotonic() + timeout_s
        delay_s = 0.005
        while True:
            try:
                status, _ = await asyncio.wait_for(client.call("GET", "/ready"), 2.0)
                if status == 200:
                    return
                if status == 500:
                    raise RuntimeError("the raw replica failed to load its model")
            except (HarnessUnavailable, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the raw replica did not get ready in time")
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 1.5, 0.05)


async def predict(client: HarnessClient) -> None:
    status, body = await asyncio.wait_for(client.call("POST", "/predict", {"inputs": [PAYLOAD]}), CALL_TIMEOUT_S)
    if status != 200 or not isinstance(body, dict) or body.get("outputs") != [PAYLOAD]:
        raise RuntimeError(f"raw call failed: {status} {str(body)[:200]}")


# ---- the stack's side --------------------------------------------------------------------


async def call_through(stack: BenchStack, model: str, version: int, expect_start: str) -> tuple[float, dict[str, Any]]:
    t = time.perf_counter()
    status, body, headers = await stack.call(model, PAYLOAD, version=str(version), timeout_s=CALL_TIMEOUT_S)
    ms = (time.perf_counter() - t) * 1000
    if status != 200 or body != {"data": PAYLOAD}:
        raise RuntimeError(f"call to {model} v{version} failed: {status} {str(body)[:300]}")
    timing = server_timing(headers.get("Server-Timing"))
    if timing.get("start_kind") != expect_start:
        raise RuntimeError(f"expected a {expect_start} start of {model}, got {timing.get('start_kind')!r} "
                           f"({headers.get('Server-Timing')})")
    return ms, timing


def container_paused(dk: docker.DockerClient, cid: str) -> bool:
    """Paused as the kernel sees it: the proxy freezes cgroups itself (Docker then says running),
    or through dockerd where it cannot."""
    file = freezer.locate(cid)
    if file is not None and freezer.is_frozen(file):
        return True
    return bool(dk.api.inspect_container(cid).get("State", {}).get("Paused"))


async def wait_paused(stack: BenchStack, dk: docker.DockerClient, model: str) -> None:
    """Until the proxy's reaper has paused ``model``'s replica: the kernel says so and so does the proxy."""
    proxy, session = stack.proxies[0], stack.session
    assert session is not None
    label = [f"lukewarm.proxy={proxy.proxy_id}", f"lukewarm.model={model}"]

    async def paused() -> bool:
        containers = await asyncio.to_thread(dk.containers.list, all=True, filters={"label": label})
        if len(containers) != 1:
            return False
        if not await asyncio.to_thread(container_paused, dk, containers[0].id):
            return False
        replicas = (await proxy.state(session))["replicas"]
        return any(r["state"] == "paused" and r["version"].split("/")[1] == model for r in replicas)

    await wait_until(paused, PAUSE_WAIT_S, f"the {model} replica to be paused", interval_s=0.02)


# ---- the benchmark ---------------------------------------------------------------------


async def bench(rounds: int, warm_n: int) -> None:
    t_begin = time.perf_counter()
    if default_runtime() != "docker":
        raise SystemExit("starts needs a Docker engine with the base image lukewarm/python:bookworm")
    tag = uuid.uuid4().hex[:6]
    image = ""
    dk = docker.from_env(timeout=30)
    log("starting a stack (docker, one proxy with a fast reaper)")
    try:
        async with bench_stack(runtime="docker", proxies=1, reaper_interval_s=REAPER_INTERVAL_S,
                               max_replicas=rounds + 8, max_replicas_per_customer=rounds + 8) as stack:
            # Room for every round's cold version: else the per-customer quota (half the host) evicts
            # the lukewarm replica from round 10 on, and its pause is never seen.
            image = await asyncio.to_thread(stack.model, f"starts-{tag}", ECHO_SOURCE)
            raw = RawContainers(stack.state_root / "raw", image, tag)
            try:
                result, rows = await measure(stack, raw, dk, rounds, warm_n)
            finally:
                raw.close()
    finally:
        if image:
            try:
                await asyncio.to_thread(dk.images.remove, image, noprune=False)
            except docker.errors.DockerException as exc:
                log(f"could not remove image {image}: {exc}")
        dk.close()
    result["wall_s"] = time.perf_counter() - t_begin
    print(f"starts: docker, {rounds} alternating rounds, warm n={warm_n}")
    report(rows, result)


async def measure(stack: BenchStack, raw: RawContainers, dk: docker.DockerClient, rounds: int,
                  warm_n: int) -> tuple[dict[str, Any], list[list[Any]]]:
    # The lukewarm version: paused by the reaper LUKEWARM_IDLE_S after each answer.
    lw_version = await stack.deploy("lw", raw.spec.image, ENTRYPOINT, idle_timeout_s=LUKEWARM_IDLE_S)
    await call_through(stack, "lw", lw_version, "cold")
    # The raw twin: created, started, ready, warmed, paused.
    raw_cid, raw_sock = await raw.create()
    await raw.start(raw_cid)
    raw_client = HarnessClient(str(raw_sock))
    await raw.wait_ready(raw_client)
    await predict(raw_client)
    await raw.pause(raw_cid)

    lw_ms: list[float] = []
    lw_unpause_ms: list[float] = []
    raw_unpause_ms: list[float] = []
    raw_unpause_call_ms: list[float] = []
    cold_ms: list[float] = []
    cold_phases: dict[str, list[float]] = {k: [] for k in ("start-create", "start-start", "start-ready", "infer")}
    raw_cold_ms: list[float] = []
    raw_phases: dict[str, list[float]] = {k: [] for k in ("create", "start", "ready", "call")}

    async def lukewarm() -> None:
        await wait_paused(stack, dk, "lw")
        ms, timing = await call_through(stack, "lw", lw_version, "lukewarm")
        lw_ms.append(ms)
        lw_unpause_ms.append(timing.get("start-unpause", float("nan")))

    async def raw_unpause() -> None:
        t = time.perf_counter()
        await raw.unpause(raw_cid)
        t_unpaused = time.perf_counter()
        await predict(raw_client)
        t_end = time.perf_counter()
        raw_unpause_ms.append((t_end - t) * 1000)
        raw_unpause_call_ms.append((t_unpaused - t) * 1000)
        await raw.pause(raw_cid)  # for the next round (untimed)

    async def cold() -> None:
        version = await stack.deploy("cold", raw.spec.image, ENTRYPOINT)
        ms, timing = await call_through(stack, "cold", version, "cold")
        cold_ms.append(ms)
        for k in cold_phases:
            cold_phases[k].append(timing.get(k, float("nan")))

    async def raw_cold() -> None:
        t0 = time.perf_counter()
        cid, sock = await raw.create()
        t1 = time.perf_counter()
        client = HarnessClient(str(sock))
        try:
            await raw.start(cid)
            t2 = time.perf_counter()
            await raw.wait_ready(client)
            t3 = time.perf_counter()
            await predict(client)
            t4 = time.perf_counter()
        finally:
            client.close()
        raw_cold_ms.append((t4 - t0) * 1000)
        for k, (a, b) in {"create": (t0, t1), "start": (t1, t2), "ready": (t2, t3), "call": (t3, t4)}.items():
            raw_phases[k].append((b - a) * 1000)
        await raw.remove(cid)  # untimed

    for r in range(rounds):
        first_proxy = r % 2 == 0
        for step in ([lukewarm, raw_unpause] if first_proxy else [raw_unpause, lukewarm]):
            await step()
        await wait_paused(stack, dk, "lw")  # the reaper's pause must not overlap the cold pair
        for step in ([cold, raw_cold] if first_proxy else [raw_cold, cold]):
            await step()
        log(f"round {r + 1}/{rounds}: lukewarm {lw_ms[-1]:.1f} vs raw unpause {raw_unpause_ms[-1]:.1f} ms; "
            f"cold {cold_ms[-1]:.1f} vs raw {raw_cold_ms[-1]:.1f} ms")
    raw_client.close()

    # Warm: a version that stays running (default idle timeout), through the ingress and direct.
    warm_version = await stack.deploy("warm", raw.spec.image, ENTRYPOINT)
    await call_through(stack, "warm", warm_version, "cold")
    warm: list[float] = []
    for _ in range(20):
        await call_through(stack, "warm", warm_version, "warm")
    for _ in range(warm_n):
        ms, _ = await call_through(stack, "warm", warm_version, "warm")
        warm.append(ms)
    assert stack.session is not None
    proxy = stack.proxies[0]
    sockets = [proxy.socket_of(r["replica_id"]) for r in (await proxy.state(stack.session))["replicas"]
               if r["version"].split("/")[1] == "warm" and r["state"] == "running"]
    warm_direct: list[float] = []
    if sockets:
        direct = HarnessClient(str(sockets[0]))
        try:
            for _ in range(20):
                await predict(direct)
            for _ in range(warm_n):
                t = time.perf_counter()
                await predict(direct)
                warm_direct.append((time.perf_counter() - t) * 1000)
        finally:
            direct.close()

    result: dict[str, Any] = {
        "bench": "starts", "runtime": "docker", "rounds": rounds,
        "lukewarm_start_ms": p50(lw_ms), "raw_unpause_ms": p50(raw_unpause_ms),
        "lukewarm_ratio": p50(lw_ms) / p50(raw_unpause_ms),
        "cold_start_ms": p50(cold_ms), "raw_cold_ms": p50(raw_cold_ms),
        "cold_ratio": p50(cold_ms) / p50(raw_cold_ms),
        "warm_ms": p50(warm), "warm_p99_ms": p99(warm), "warm_direct_ms": p50(warm_direct),
        "lukewarm_p99_ms": p99(lw_ms), "raw_unpause_p99_ms": p99(raw_unpause_ms),
        "cold_p99_ms": p99(cold_ms), "raw_cold_p99_ms": p99(raw_cold_ms),
        "phases_ms": {
            "lukewarm_unpause": p50(lw_unpause_ms), "raw_unpause_call": p50(raw_unpause_call_ms),
            **{f"cold_{k.replace('start-', '')}": p50(v) for k, v in cold_phases.items()},
            **{f"raw_cold_{k}": p50(v) for k, v in raw_phases.items()},
        },
    }
    rows: list[list[Any]] = [
        ["start", "lukewarm p50 ms", "p99 ms", "raw p50 ms", "p99 ms", "ratio", "where the time goes (p50 ms)"],
        ["lukewarm (paused)", p50(lw_ms), p99(lw_ms), p50(raw_unpause_ms), p99(raw_unpause_ms),
         result["lukewarm_ratio"],
         f"unpause {p50(lw_unpause_ms):.1f} / raw {p50(raw_unpause_call_ms):.1f}"],
        ["cold (local image)", p50(cold_ms), p99(cold_ms), p50(raw_cold_ms), p99(raw_cold_ms), result["cold_ratio"],
         "create {:.1f}/{:.1f} start {:.1f}/{:.1f} ready {:.1f}/{:.1f}".format(
             p50(cold_phases["start-create"]), p50(raw_phases["create"]), p50(cold_phases["start-start"]),
             p50(raw_phases["start"]), p50(cold_phases["start-ready"]), p50(raw_phases["ready"]))],
        ["warm", p50(warm), p99(warm), p50(warm_direct), p99(warm_direct), p50(warm) / p50(warm_direct),
         "through ingress+proxy / direct on socket"],
    ]
    return result, rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.starts", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warm-n", type=int, default=200, help="warm calls for the warm p50")
    args = parser.parse_args(argv)
    run_async(bench(max(1, args.rounds), max(1, args.warm_n)))


if __name__ == "__main__":
    main()
