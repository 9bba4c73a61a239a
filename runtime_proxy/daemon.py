"""Wires the runtime proxy: settings → runtime → replica manager → heartbeat → HTTP.

Resources live in ``cleanup_ctx`` generators, set up in order and torn down
in reverse. A stop never stops containers: the next start re-adopts them.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as redis
from aiohttp import web

from runtime_proxy import routes
from runtime_proxy.gpu import GpuCoordinator
from runtime_proxy.heartbeat import Fenced, Heartbeat
from runtime_proxy.ledger import ChunkLedger
from runtime_proxy.nvml import NoGpu, Nvml, RealNvml
from runtime_proxy.replicas import ReplicaManager
from runtime_proxy.runtime import Runtime
from runtime_proxy.usage import UsageMeter
from runtime_proxy.versions import VersionSource
from shared import serving
from shared.background import Periodic
from shared.eventloop import settle_after_startup
from shared.http import LIMITS, BodyLimits, error_middleware
from shared.hugeheap import FRONTIER_EVERY_S, HeapFrontier
from shared.metrics import ProxyMetrics
from shared.redisclient import connect
from shared.settings import ProxySettings
from shared.signing import ReplayGuard, derive_key

log = logging.getLogger("lukewarm.proxy")

HARNESS_SOURCE = Path(__file__).with_name("harness.py")
REDIS_TIMEOUT_S = 2.0


def make_runtime(kind: str, log_max_mb: int = 10, registry_auth_file: str = "") -> Runtime:
    """The runtime named by ``kind``; ``auto`` is Docker, and no engine answering is an error.

    The process runtime isolates nothing: it runs only when named, never as a fallback.
    """
    from runtime_proxy.docker_runtime import DockerRuntime, docker_available
    from runtime_proxy.process_runtime import ProcessRuntime

    if kind == "auto":
        if not docker_available():
            raise SystemExit("LUKEWARM_RUNTIME=auto: no Docker engine answers (start dockerd); the process "
                             "runtime isolates nothing and runs only when named (LUKEWARM_RUNTIME=process)")
        kind = "docker"
    if kind == "docker":
        return DockerRuntime(log_max_mb=log_max_mb, registry_auth_file=registry_auth_file)
    if kind == "process":
        return ProcessRuntime()
    raise SystemExit(f"unknown runtime {kind!r}: use docker, process or auto")


def install_harness(state_dir: Path) -> Path:
    """Copy the harness to a content-addressed file: running containers keep the file they mounted."""
    data = HARNESS_SOURCE.read_bytes()
    target = state_dir / f"harness-{hashlib.sha256(data).hexdigest()[:12]}.py"
    if not target.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        shutil.copyfile(HARNESS_SOURCE, tmp)
        tmp.chmod(0o644)
        tmp.replace(target)
    return target


def build_app(settings: ProxySettings, runtime: Runtime | None = None,
              nvml_adapter: Nvml | None = None) -> web.Application:
    if not settings.proxy_secret:
        raise SystemExit("LUKEWARM_PROXY_SECRET must be set: ingresses authenticate with it")
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_body_mb * 1024 * 1024)
    app[routes.SETTINGS] = settings
    app[routes.SIGNING_KEY] = derive_key(settings.proxy_secret)
    app[routes.REPLAYS] = ReplayGuard()
    app[routes.LEDGER] = ChunkLedger(settings.dedup_window_s, settings.dedup_max_mb * 2**20)
    app[routes.METRICS] = ProxyMetrics()
    app[routes.DRAINING] = asyncio.Event()
    app[serving.SHUTDOWN] = asyncio.Event()
    drains: list[Callable[[], Awaitable[None]]] = []

    async def drain(app: web.Application) -> None:
        """SIGTERM, before the requests in flight are awaited: no new chunks, and out of the fleet at once
        (ingresses stop routing here now, not at the heartbeat's expiry)."""
        app[routes.DRAINING].set()
        for step in drains:
            await step()

    app.on_shutdown.append(drain)
    # Inputs are the customer's, parsed again by the harness: depth stays far below what it survives.
    app[LIMITS] = BodyLimits(timeout_s=30.0, max_depth=128)
    routes.add_routes(app)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        rt = runtime or make_runtime(settings.runtime, settings.log_max_mb, settings.registry_auth_file)
        harness = install_harness(Path(settings.state_dir))
        nvml: Nvml = nvml_adapter or (RealNvml() if settings.gpus else NoGpu())
        gpu = GpuCoordinator(nvml, min_residency_s=settings.gpu_min_residency_s,
                             release_timeout_s=settings.gpu_release_timeout_s)
        client = connect(settings.redis_url, REDIS_TIMEOUT_S)
        versions = app[routes.VERSIONS] = VersionSource(client, settings.spec_cache_s)
        manager = ReplicaManager(rt, settings, harness, gpu=gpu, versions=versions)
        gpu.usage = manager.gpu_usage
        adopted = await manager.adopt()
        app[routes.MANAGER] = manager
        async def state() -> dict[str, Any]:
            return {"replicas": manager.snapshot(), "waiting": manager.waiting(), "gpus": await gpu.snapshot(),
                    "nvml": nvml.status(), "budgets": {"memory_budget_mb": manager.memory_budget_mb,
                                                       "max_replicas_per_customer": manager.customer_quota}}

        heartbeat = Heartbeat(client, settings, state, rt.name)
        await heartbeat.take_epoch()
        await heartbeat.beat_once()  # routable from the moment it serves

        async def beat() -> None:
            try:
                await heartbeat.beat_once()
            except Fenced as exc:
                # A newer start of this proxy id owns the replicas now (this one was partitioned or hung).
                log.error("%s", exc)
                app[serving.SHUTDOWN].set()

        beats = Periodic("heartbeat", settings.heartbeat_interval_s, beat)

        async def leave_fleet() -> None:
            await beats.stop()
            try:
                await heartbeat.withdraw()
            except redis.RedisError as exc:
                log.warning("could not withdraw the heartbeat: %s", exc)

        drains.append(leave_fleet)
        reaper = Periodic("reaper", settings.reaper_interval_s, manager.reap_once)
        meter = UsageMeter(client, manager.snapshot, settings.usage_flush_s)
        metering = Periodic("usage", settings.usage_tick_s, meter.tick)
        frontier = HeapFrontier()
        frontier_rounds = Periodic("heap-frontier", FRONTIER_EVERY_S, frontier.run_round)
        beats.start()
        reaper.start()
        metering.start()
        log.info("proxy %s up (runtime %s, epoch %d, %d replicas adopted)",
                 settings.proxy_id, rt.name, heartbeat.epoch, adopted)
        settle_after_startup()  # fewer and shorter loop stalls from here on (shared/eventloop.py)
        frontier.settle()  # the heap's reserve grown and faulted in now, not by a chunk (shared/hugeheap.py)
        frontier_rounds.start()
        yield
        await frontier_rounds.stop()
        await reaper.stop()
        await metering.stop()
        # The seconds up to now, before the replicas are stopped (or left for the next start to adopt).
        await meter.close()
        await leave_fleet()  # again: a stop without SIGTERM (a test's runner) skips on_shutdown
        await app[routes.LEDGER].close()
        # Docker containers outlive the proxy (re-adopted next start); child processes cannot.
        await manager.close(stop_replicas=settings.stop_replicas_on_exit or rt.name == "process")
        await gpu.close()
        await nvml.close()
        await rt.close()
        await client.aclose()

    app.cleanup_ctx.append(lifecycle)
    return app
