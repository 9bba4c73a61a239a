"""What each start tier is worth for a real model: one that loads a few hundred MB of weights at import.

``python -m loadtests.model_starts [--weights-mb 300] [--rounds 5] [--warm-n 20] [--loader auto|numpy|python]``

The model (``loadtests/models/weights_model``) is built here the way ``lukewarm deploy --build`` builds
a directory (lukewarm/build.py: ``requirements.txt`` installed offline from the wheelhouse, ``train.py``
run at build time), so the weights are made inside the image at build time and nothing large is left on
the host. Its import reads them all into memory (``np.load``, or a plain ``readinto`` with
``--loader python``, the fallback of ``auto`` when no numpy wheel can be had) and checks a sample; its
``predict`` dots one row with itself and reports the import's own timings and a load id (new on every
import). Then one stack (own Redis, one proxy with a fast reaper that stops a paused replica
``PAUSE_STOP_AFTER_S`` after pausing it, the ingress), and per round, the four tiers in an order that
rotates round by round (so machine noise hits all alike), each the time of the first answer through
ingress + proxy:

- **cold**: a fresh version (no replica exists): create + start + import (load) + answer.
- **stopped** (lukewarm): a replica the proxy's idle policy paused, then stopped: start + load + answer.
- **paused** (lukewarm): a replica the proxy's reaper paused: thaw + answer.
- **warm**: a running replica (``--warm-n`` calls per round).

Before each step every other replica has reached its idle state (stopped; the warm one running), so no
pause or stop runs under a measurement; every wait is bounded. Each answer is checked: the start kind
the ingress reports (Server-Timing) and the load id (a new process for cold and stopped, the same one
for paused and warm). The Server-Timing phases and the model's own load timings show where cold time
goes. Prints a table, then as the last line one JSON object (``"bench": "model_starts"``). Everything
started here is removed: the containers (by this run's proxy id), the image tag built here, the build
directory, the proxy, the Redis.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import docker

from loadtests.common import (
    BenchStack,
    bench_stack,
    default_runtime,
    log,
    p50,
    p99,
    report,
    run_async,
    wait_until,
)
from loadtests.starts import server_timing

MODEL_DIR = Path(__file__).resolve().parent / "models" / "weights_model"
ENTRYPOINT = "main:predict"
TIERS = ("cold", "stopped", "paused", "warm")
IDLE_S = 0.3               # idle timeout of the lukewarm versions: paused this long after an answer
PAUSE_STOP_AFTER_S = 2.0   # the proxy's pause_stop_after_s: a paused replica is stopped this much later
REAPER_INTERVAL_S = 0.05
WARM_IDLE_S = 3600.0       # the warm version is never paused during a run
SETTLE_S = 90.0            # bound on waiting for the replicas to reach the states a step needs
CALL_TIMEOUT_S = 180.0
BUILD_TIMEOUT_S = 900.0
CGROUP_ROOT = Path("/sys/fs/cgroup")


# ---- the model image -------------------------------------------------------------------


def build_model_image(work: Path, weights_mb: int, loader: str, tag: str) -> str:
    """Build the weights model as ``tag`` through lukewarm/build.py's offline path; the loader it uses.

    ``auto``: numpy when its wheel can be installed from the wheelhouse (or fetched into it), else the
    plain-Python loader. Blocking (seconds to a minute: the image holds ``weights_mb`` of fresh data).
    """
    from lukewarm.build import BuildError, prepare_context
    from runtime_proxy.docker_runtime import build_image

    choices = ["numpy", "python"] if loader == "auto" else [loader]
    for choice in choices:
        source = work / f"src-{choice}"
        shutil.copytree(MODEL_DIR, source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (source / "config.json").write_text(json.dumps({"mb": weights_mb, "loader": choice}))
        if choice == "python":
            (source / "requirements.txt").unlink()
        try:
            context = prepare_context(source, work / f"ctx-{choice}")
        except BuildError as exc:
            if choice != choices[-1]:
                log(f"numpy cannot be installed offline ({exc}); the model loads with plain Python instead")
                continue
            raise SystemExit(f"model_starts: cannot prepare the model: {exc}") from None
        build_image(str(context), tag, timeout_s=BUILD_TIMEOUT_S)
        return choice
    raise AssertionError("unreachable")


# ---- what the proxy and the engine say about this run's replicas ----------------------------


def frozen(container_id: str) -> bool | None:
    """Whether the container's cgroup freezer says FROZEN (a pause by dockerd or by the proxy itself,
    which dockerd then reports as running); None where no freezer file is found."""
    for path in (CGROUP_ROOT / "freezer" / "docker" / container_id / "freezer.state",
                 CGROUP_ROOT / "freezer" / "system.slice" / f"docker-{container_id}.scope" / "freezer.state"):
        try:
            return path.read_text().strip() == "FROZEN"
        except OSError:
            continue
    for path in (CGROUP_ROOT / "system.slice" / f"docker-{container_id}.scope" / "cgroup.events",
                 CGROUP_ROOT / "docker" / container_id / "cgroup.events"):
        try:
            return "frozen 1" in path.read_text().splitlines()
        except OSError:
            continue
    return None


@dataclasses.dataclass(frozen=True)
class Seen:
    """One replica as the proxy and the engine both see it; ``state`` is set only where they agree."""

    model: str
    version: int
    state: str  # running | paused | stopped | "" (in between, or the two disagree)


def agreed_state(proxy_state: str, in_flight: int, engine_state: str, is_frozen: bool | None) -> str:
    if in_flight:
        return ""
    if proxy_state == "running" and engine_state == "running" and is_frozen is not True:
        return "running"
    if proxy_state == "paused" and (engine_state == "paused" or is_frozen is True):
        return "paused"
    if proxy_state == "stopped" and engine_state == "exited":
        return "stopped"
    return ""


async def fleet(stack: BenchStack, dk: docker.DockerClient) -> list[Seen]:
    proxy = stack.proxies[0]
    assert stack.session is not None
    replicas = (await proxy.state(stack.session))["replicas"]
    listed = await asyncio.to_thread(dk.api.containers, all=True, filters={"label": f"lukewarm.proxy={proxy.proxy_id}"})
    engine = {(c.get("Labels") or {}).get("lukewarm.replica", ""): c for c in listed}
    seen = []
    for r in replicas:
        _, model, _, version = str(r["version"]).split("/")
        container = engine.get(r["replica_id"])
        state = "" if container is None else agreed_state(
            r["state"], int(r.get("in_flight", 0)), str(container.get("State", "")),
            frozen(str(container["Id"])) if r["state"] == "paused" else None)
        seen.append(Seen(model, int(version), state))
    return seen


async def settle(stack: BenchStack, dk: docker.DockerClient, wants: dict[str, str], what: str) -> None:
    """Until every replica of a model named in ``wants`` is in that state (and there is at least one),
    and every other replica is stopped: nothing pauses or stops under the next measurement."""
    async def done() -> bool:
        seen = await fleet(stack, dk)
        if any(s.state != wants.get(s.model, "stopped") for s in seen):
            return False
        return all(any(s.model == model for s in seen) for model in wants)

    await wait_until(done, SETTLE_S, what, interval_s=0.02)


# ---- one timed answer ------------------------------------------------------------------------


@dataclasses.dataclass
class Answer:
    ms: float
    timing: dict[str, Any]
    load_id: str
    load: dict[str, Any]


async def call(stack: BenchStack, model: str, version: int, expect_start: str, row: int) -> Answer:
    t = time.perf_counter()
    status, body, headers = await stack.call(model, {"row": row}, version=str(version), timeout_s=CALL_TIMEOUT_S)
    ms = (time.perf_counter() - t) * 1000
    data = body.get("data") if isinstance(body, dict) else None
    if status != 200 or not isinstance(data, dict) or data.get("row") is None or "load_id" not in data:
        raise RuntimeError(f"call to {model} v{version} failed: {status} {str(body)[:300]}")
    timing = server_timing(headers.get("Server-Timing"))
    if timing.get("start_kind") != expect_start:
        raise RuntimeError(f"expected a {expect_start} start of {model} v{version}, got {timing.get('start_kind')!r} "
                           f"({headers.get('Server-Timing')})")
    return Answer(ms, timing, str(data["load_id"]), dict(data.get("load") or {}))


# ---- the benchmark ---------------------------------------------------------------------------


class Rounds:
    """The versions, the answers per tier, and one step per tier."""

    def __init__(self, stack: BenchStack, dk: docker.DockerClient, image: str, memory_mb: int, warm_n: int) -> None:
        self.stack, self.dk, self.image, self.memory_mb, self.warm_n = stack, dk, image, memory_mb, warm_n
        self.versions: dict[str, int] = {}
        self.load_ids: dict[str, str] = {}
        self.answers: dict[str, list[Answer]] = {tier: [] for tier in TIERS}
        self.row = 0

    async def deploy(self, model: str, idle_timeout_s: float) -> int:
        return await self.stack.deploy(model, self.image, ENTRYPOINT, memory_mb=self.memory_mb,
                                       idle_timeout_s=idle_timeout_s, timeout_s=CALL_TIMEOUT_S)

    async def call(self, model: str, expect_start: str) -> Answer:
        self.row += 1
        return await call(self.stack, model, self.versions[model], expect_start, self.row)

    async def setup(self) -> None:
        """The stopped, paused and warm versions, each with one replica (started cold, untimed)."""
        for model in ("stopped", "paused", "warm"):
            self.versions[model] = await self.deploy(model, WARM_IDLE_S if model == "warm" else IDLE_S)
            self.load_ids[model] = (await self.call(model, "cold")).load_id

    def step(self, tier: str) -> Callable[[], Awaitable[None]]:
        return {"cold": self.cold, "stopped": self.stopped, "paused": self.paused, "warm": self.warm}[tier]

    async def cold(self) -> None:
        await settle(self.stack, self.dk, {"warm": "running"}, "every replica but the warm one stopped")
        self.versions["cold"] = await self.deploy("cold", IDLE_S)
        answer = await self.call("cold", "cold")
        if answer.load_id in self.load_ids.values():
            raise RuntimeError("a cold start answered from a process that had loaded before")
        self.answers["cold"].append(answer)

    async def stopped(self) -> None:
        await settle(self.stack, self.dk, {"warm": "running", "stopped": "stopped"}, "the stopped replica stopped")
        answer = await self.call("stopped", "lukewarm")
        if answer.load_id == self.load_ids["stopped"]:
            raise RuntimeError("the stopped replica answered without loading again: was it stopped?")
        self.load_ids["stopped"] = answer.load_id
        self.answers["stopped"].append(answer)

    async def paused(self) -> None:
        await settle(self.stack, self.dk, {"warm": "running"}, "every replica but the warm one stopped")
        # Its replica is stopped now: started again (untimed), then left to the reaper to pause.
        self.load_ids["paused"] = (await self.call("paused", "lukewarm")).load_id
        await settle(self.stack, self.dk, {"warm": "running", "paused": "paused"}, "the paused replica paused")
        answer = await self.call("paused", "lukewarm")
        if answer.load_id != self.load_ids["paused"]:
            raise RuntimeError("the paused replica answered from a new process: was it stopped meanwhile?")
        self.answers["paused"].append(answer)

    async def warm(self) -> None:
        await settle(self.stack, self.dk, {"warm": "running"}, "every replica but the warm one stopped")
        for _ in range(self.warm_n):
            answer = await self.call("warm", "warm")
            if answer.load_id != self.load_ids["warm"]:
                raise RuntimeError("the warm replica answered from a new process")
            self.answers["warm"].append(answer)


async def bench(weights_mb: int, rounds: int, warm_n: int, loader: str) -> None:
    t_begin = time.perf_counter()
    if default_runtime() != "docker":
        raise SystemExit("model_starts needs a Docker engine with the base image lukewarm/python:bookworm")
    image = f"lukewarm-bench/model-starts:{uuid.uuid4().hex[:8]}"
    dk = docker.from_env(timeout=60)
    built = False
    try:
        log(f"building {image}: {weights_mb} MiB of weights (loader {loader})")
        t = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="lwms-") as work:
            built = True  # from here a half-built tag may exist: removed below either way
            loader = await asyncio.to_thread(build_model_image, Path(work), weights_mb, loader, image)
        build_s = time.perf_counter() - t
        log(f"built in {build_s:.1f} s (loader {loader}); starting a stack (docker, one proxy, fast reaper)")
        async with bench_stack(runtime="docker", proxies=1, reaper_interval_s=REAPER_INTERVAL_S,
                               pause_stop_after_s=PAUSE_STOP_AFTER_S, max_replicas=rounds + 8) as stack:
            runs = Rounds(stack, dk, image, memory_mb=weights_mb + 512, warm_n=warm_n)
            await runs.setup()
            for r in range(rounds):
                order = TIERS[r % len(TIERS):] + TIERS[:r % len(TIERS)]
                for tier in order:
                    await runs.step(tier)()
                log(f"round {r + 1}/{rounds} ({', '.join(order)}): " + ", ".join(
                    f"{tier} {runs.answers[tier][-1].ms:.1f}" for tier in TIERS) + " ms")
            answers = runs.answers
    finally:
        if built:
            try:
                await asyncio.to_thread(dk.images.remove, image, noprune=False)
            except docker.errors.ImageNotFound:
                pass
            except docker.errors.DockerException as exc:
                log(f"could not remove image {image}: {exc}")
        dk.close()
    result, rows = summarize(answers, weights_mb, loader, rounds, warm_n)
    result["build_s"] = build_s
    result["wall_s"] = time.perf_counter() - t_begin
    load = result["load_ms"]
    print(f"model_starts: docker, {weights_mb} MiB of weights ({loader}), {rounds} rotating rounds, "
          f"warm n={warm_n}/round; a paused replica is stopped {PAUSE_STOP_AFTER_S:g} s after its pause")
    print(f"the model's own load (inside, p50 of cold and stopped starts): {load['total']:.1f} ms = "
          f"imports {load['import']:.1f} + read {load['read']:.1f} ({load['read_mb_per_s']:.0f} MB/s) "
          f"+ check {load['check']:.1f}; before it, process age at import {load['boot']:.0f} ms")
    report(rows, result)


def _phase(answers: list[Answer], name: str) -> float:
    return p50([a.timing.get(name, float("nan")) for a in answers if name in a.timing])


def summarize(answers: dict[str, list[Answer]], weights_mb: int, loader: str, rounds: int,
              warm_n: int) -> tuple[dict[str, Any], list[list[Any]]]:
    ms = {tier: [a.ms for a in answers[tier]] for tier in TIERS}
    cold = p50(ms["cold"])
    loads = [a.load for tier in ("cold", "stopped") for a in answers[tier]]

    def load_p50(key: str) -> float:
        return p50([float(x[key]) for x in loads if isinstance(x.get(key), (int, float))])

    load = {k: load_p50(f"{k}_ms") for k in ("boot", "import", "read", "check", "total")}
    load["read_mb_per_s"] = weights_mb / (load["read"] / 1000) if load["read"] > 0 else float("nan")
    phases: dict[str, dict[str, float]] = {}
    rows: list[list[Any]] = [["tier", "p50 ms", "p99 ms", "min", "max", "vs cold", "create", "start", "ready",
                              "of it: load", "unpause", "infer", "rest"]]
    for tier in TIERS:
        mine = answers[tier]
        start_total = _phase(mine, "start")
        phase = {
            "create": _phase(mine, "start-create"), "start": _phase(mine, "start-start"),
            "ready": _phase(mine, "start-ready"), "unpause": _phase(mine, "start-unpause"),
            "infer": _phase(mine, "infer"),
            # What a start's first answer costs besides the start and the call itself: ingress, proxy, queue.
            "rest": p50([a.ms - a.timing.get("start", 0.0) - a.timing.get("infer", 0.0) for a in mine]),
            "start_total": start_total,
        }
        if tier in ("cold", "stopped"):
            phase["model_load"] = p50([float(a.load.get("total_ms", float("nan"))) for a in mine])
        phases[tier] = phase
        rows.append([tier, p50(ms[tier]), p99(ms[tier]), min(ms[tier]), max(ms[tier]), p50(ms[tier]) / cold,
                     phase["create"], phase["start"], phase["ready"], phase.get("model_load", float("nan")),
                     phase["unpause"], phase["infer"], phase["rest"]])
    result: dict[str, Any] = {
        "bench": "model_starts", "runtime": "docker", "weights_mb": weights_mb, "loader": loader,
        "rounds": rounds, "warm_n": warm_n,
        "cold_ms": cold, "stopped_ms": p50(ms["stopped"]), "paused_ms": p50(ms["paused"]), "warm_ms": p50(ms["warm"]),
        "stopped_vs_cold": p50(ms["stopped"]) / cold, "paused_vs_cold": p50(ms["paused"]) / cold,
        "warm_vs_cold": p50(ms["warm"]) / cold,
        **{f"{tier}_{stat}_ms": fn(ms[tier]) for tier in TIERS
           for stat, fn in (("p99", p99), ("min", min), ("max", max))},
        "load_ms": load, "phases_ms": phases,
        "idle_timeout_s": IDLE_S, "pause_stop_after_s": PAUSE_STOP_AFTER_S,
    }
    return result, rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.model_starts", description=__doc__.split("\n")[0])
    parser.add_argument("--weights-mb", type=int, default=300, help="MiB of weights the model loads at import")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warm-n", type=int, default=20, help="warm calls per round")
    parser.add_argument("--loader", choices=("auto", "numpy", "python"), default="auto",
                        help="how the model reads its weights (auto: numpy when its wheel can be had)")
    args = parser.parse_args(argv)
    run_async(bench(max(1, args.weights_mb), max(1, args.rounds), max(1, args.warm_n), args.loader))


if __name__ == "__main__":
    main()
