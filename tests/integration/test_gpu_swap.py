"""GPU swaps through the real replica manager, with real harness processes and a fake NVML.

One GPU, two GPU versions: the second must wait until the first is drained,
stopped and NVML shows its memory released (or it is killed), and is pinned
to the GPU by uuid. The fake NVML simulates slow release, memory never
released and a hanging driver; everything else is real.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from runtime_proxy.daemon import install_harness
from runtime_proxy.gpu import GpuCoordinator
from runtime_proxy.nvml import FakeNvml
from runtime_proxy.process_runtime import ProcessRuntime
from runtime_proxy.replicas import ReplicaManager
from shared.errors import ApiError
from shared.messages import ChunkRequest, VersionSpec
from shared.settings import ProxySettings
from tests.support.stack import MODELS_DIR

pytestmark = pytest.mark.timeout(60)


class GpuProcessRuntime(ProcessRuntime):
    """The process runtime, telling the fake NVML when a replica takes or frees GPU memory."""

    def __init__(self, nvml: FakeNvml, release_after_s: float = 0.0, stuck: bool = False) -> None:
        super().__init__()
        self.nvml, self.release_after_s, self.stuck = nvml, release_after_s, stuck
        self.stopped: list[str] = []
        self.killed: list[str] = []
        self.removing: set[str] = set()

    async def start(self, handle: str) -> None:
        await super().start(handle)
        launch = self._launches[handle]
        if launch.gpu_uuid:
            self.nvml.attach(launch.gpu_uuid, handle, 4000)

    async def stop(self, handle: str, timeout_s: float) -> None:
        self.stopped.append(handle)
        if self.stuck:  # a process wedged in the driver: the stop does nothing, its memory stays
            self.nvml.detach(handle, never=True)
            return
        await super().stop(handle, timeout_s)
        self.nvml.detach(handle, release_after_s=self.release_after_s)

    async def kill(self, handle: str) -> None:
        if handle not in self.removing:  # remove() kills too: count only the coordinator's kills
            self.killed.append(handle)
            self.nvml.detach(handle)  # a kill frees the memory a stop could not
        await super().kill(handle)

    async def remove(self, handle: str) -> None:
        self.removing.add(handle)
        await super().remove(handle)


def spec(version: int, **kw: object) -> VersionSpec:
    return VersionSpec("acme", "vision", "main", version, f"dir:{MODELS_DIR}", entrypoint="models:visible_gpu",
                       gpu=True, **kw)  # type: ignore[arg-type]


def chunk(s: VersionSpec, timeout_s: float = 20.0) -> ChunkRequest:
    return ChunkRequest(spec=s, inputs=[None], timeout_s=timeout_s, request_id="t")


@contextlib.asynccontextmanager
async def gpu_manager(state_dir: Path, runtime: GpuProcessRuntime, nvml: FakeNvml,
                      **gpu_kw: float) -> AsyncIterator[ReplicaManager]:
    """A replica manager with a GPU coordinator over ``nvml``; its replicas are removed on exit."""
    settings = ProxySettings(proxy_id="gpu-test", state_dir=str(state_dir), proxy_secret="s")
    gpu = GpuCoordinator(nvml, poll_s=0.02, **gpu_kw)  # type: ignore[arg-type]
    manager = ReplicaManager(runtime, settings, install_harness(state_dir), gpu=gpu)
    gpu.usage = manager.gpu_usage
    try:
        yield manager
    finally:
        await manager.close(stop_replicas=True)
        await runtime.close()


async def test_swap_waits_for_release_then_pins_the_new_model(state_dir: Path) -> None:
    nvml = FakeNvml(1)
    runtime = GpuProcessRuntime(nvml, release_after_s=0.4)
    uuid = (await nvml.gpus())[0].uuid
    async with gpu_manager(state_dir, runtime, nvml, min_residency_s=0.0, release_timeout_s=5.0) as manager:
        first = await manager.run_chunk(chunk(spec(1)))
        assert first.outputs == [uuid]
        [a] = manager.replicas.values()
        started = time.monotonic()
        second = await manager.run_chunk(chunk(spec(2)))
        assert second.outputs == [uuid], "the new model sees only its GPU"
        assert runtime.stopped == [a.handle] and runtime.killed == [], "stopped (not paused), not killed"
        assert time.monotonic() - started >= 0.4, "started only after the old memory was released"
        assert second.timings["gpu_ms"] >= 400
        assert [r.spec.version for r in manager.replicas.values()] == [2]


async def test_memory_never_released_kills_the_old_model(state_dir: Path) -> None:
    nvml = FakeNvml(1)
    runtime = GpuProcessRuntime(nvml, stuck=True)
    async with gpu_manager(state_dir, runtime, nvml, min_residency_s=0.0, release_timeout_s=0.3,
                           kill_grace_s=1.0) as manager:
        await manager.run_chunk(chunk(spec(1)))
        [a] = manager.replicas.values()
        result = await manager.run_chunk(chunk(spec(2)))
        assert result.outputs == [(await nvml.gpus())[0].uuid]
        assert runtime.killed == [a.handle]


async def test_minimum_residency_gives_503_with_retry_after(state_dir: Path) -> None:
    nvml = FakeNvml(1)
    runtime = GpuProcessRuntime(nvml)
    async with gpu_manager(state_dir, runtime, nvml, min_residency_s=30.0, release_timeout_s=1.0) as manager:
        await manager.run_chunk(chunk(spec(1)))
        with pytest.raises(ApiError) as info:
            await manager.run_chunk(chunk(spec(2), timeout_s=0.5))
        assert info.value.status == 503
        assert int(info.value.headers["Retry-After"]) >= 1
        assert runtime.stopped == [], "the resident model keeps its GPU"
        assert (await manager.run_chunk(chunk(spec(1)))).start == "warm"


async def test_hanging_nvml_is_bounded(state_dir: Path) -> None:
    nvml = FakeNvml(1, hang=True)
    runtime = GpuProcessRuntime(nvml)
    async with gpu_manager(state_dir, runtime, nvml, min_residency_s=0.0, nvml_timeout_s=0.2) as manager:
        started = time.monotonic()
        with pytest.raises(ApiError) as info:
            await manager.run_chunk(chunk(spec(1), timeout_s=5))
        assert info.value.status == 503
        assert time.monotonic() - started < 5


async def test_cpu_versions_are_untouched_by_gpu_logic(state_dir: Path) -> None:
    nvml = FakeNvml(0)
    runtime = GpuProcessRuntime(nvml)
    async with gpu_manager(state_dir, runtime, nvml) as manager:
        cpu = VersionSpec("acme", "echo", "main", 1, f"dir:{MODELS_DIR}", entrypoint="models:visible_gpu")
        # A CPU version sees no GPU: the proxy sets the variables whatever its env says.
        assert (await manager.run_chunk(chunk(cpu))).outputs == [""]
        with pytest.raises(ApiError) as info:
            await manager.run_chunk(chunk(spec(1)))
        assert info.value.status == 503 and "no GPU" in info.value.message
