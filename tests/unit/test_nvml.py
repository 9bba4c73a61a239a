"""The NVML adapter: cgroup parsing, the real adapter without a GPU (and over a stub
pynvml), time bounds, and the fake used by the GPU coordinator's tests."""
from __future__ import annotations

import asyncio
import os
import sys
import threading
import types
from pathlib import Path

import pytest

from runtime_proxy.nvml import (
    FakeNvml, GpuInfo, GpuProcess, NoGpu, NvmlError, NvmlTimeout, RealNvml, bounded, container_id_from_cgroup,
    container_of_pid, fake_gpu,
)

pytestmark = pytest.mark.timeout(10)

CID = "4f3c2b1a" * 8
OTHER = "0123abcd" * 8
# Bounds a wait that would hang if the time bound under test failed; the bound itself is far shorter.
WAIT_S = 5.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # cgroup v1, cgroupfs driver: every controller names the container
        (f"12:memory:/docker/{CID}\n11:cpu,cpuacct:/docker/{CID}\n1:name=systemd:/docker/{CID}\n", CID),
        # cgroup v1, systemd driver
        (f"9:devices:/system.slice/docker-{CID}.scope\n", CID),
        # cgroup v2, cgroupfs driver
        (f"0::/docker/{CID}\n", CID),
        # cgroup v2, systemd driver, and a nested cgroup inside the container
        (f"0::/system.slice/docker-{CID}.scope\n", CID),
        (f"0::/system.slice/docker-{CID}.scope/init.scope\n", CID),
        (f"0::/docker/{CID}/sub\n", CID),
        # the first docker line wins
        (f"5:pids:/docker/{CID}\n4:blkio:/docker/{OTHER}\n", CID),
        # not Docker
        ("0::/user.slice/user-1000.slice/session-3.scope\n", None),
        ("0::/init.scope\n", None),
        ("0::/\n", None),
        ("", None),
        (f"0::/kubepods/besteffort/pod1234/{CID}\n", None),
        (f"0::/system.slice/cri-containerd-{CID}.scope\n", None),
        (f"0::/machine.slice/libpod-{CID}.scope\n", None),
        # not a full id, or not an id at all
        ("0::/docker/4f3c2b1a4f3c\n", None),
        (f"0::/docker/{CID}x\n", None),
        (f"0::/docker/{CID.upper()}\n", None),
        ("0::/system.slice/docker.service\n", None),
    ],
)
def test_container_id_from_cgroup(text: str, expected: str | None) -> None:
    assert container_id_from_cgroup(text) == expected


def test_container_of_pid_reads_proc(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cgroup").write_text(f"0::/system.slice/docker-{CID}.scope\n")
    assert container_of_pid(42, tmp_path) == CID
    assert container_of_pid(43, tmp_path) is None  # gone, or not ours to read


def test_container_of_this_process_is_none_or_an_id() -> None:
    found = container_of_pid(os.getpid())
    assert found is None or len(found) == 64


# ---- the real adapter on this machine (no GPU, no driver) --------------------------


async def test_real_nvml_without_gpu_reports_none() -> None:
    nvml = RealNvml(timeout_s=5.0)
    assert await nvml.gpus() == []
    assert await nvml.processes() == []
    assert "NVML" in nvml.status()
    await nvml.close()


async def test_no_gpu_reports_nothing() -> None:
    nvml = NoGpu()
    assert await nvml.gpus() == [] and await nvml.processes() == []
    assert nvml.status() == "GPU support is off"


# ---- the real adapter over a stub pynvml ------------------------------------------


class StubNvmlError(Exception):
    pass


def stub_pynvml(block: threading.Event | None = None, init_error: Exception | None = None) -> types.ModuleType:
    """Two GPUs; GPU 0 runs a compute process (also listed as graphics) and one of unknown memory."""
    mod = types.ModuleType("pynvml")
    mod.NVMLError = StubNvmlError  # type: ignore[attr-defined]
    state = {"inits": 0}

    def init() -> None:
        state["inits"] += 1
        if init_error is not None:
            raise init_error

    def count() -> int:
        if block is not None:
            block.wait()
        return 2

    def utilization(h: int) -> types.SimpleNamespace:
        if h == 1:
            raise StubNvmlError("Not Supported")
        return types.SimpleNamespace(gpu=37)

    def proc(pid: int, gib: int | None) -> types.SimpleNamespace:
        return types.SimpleNamespace(pid=pid, usedGpuMemory=None if gib is None else gib * 2**30)

    def memory(h: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(total=80 * 2**30, used=3 * 2**30 if h == 0 else 0)

    mod.__dict__.update(
        nvmlInit=init, nvmlShutdown=lambda: None, nvmlDeviceGetCount=count,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetUUID=lambda h: f"GPU-{h}".encode() if h else f"GPU-{h}",  # bytes or str, by version
        nvmlDeviceGetName=lambda h: "NVIDIA H100 80GB HBM3",
        nvmlDeviceGetMemoryInfo=memory, nvmlDeviceGetUtilizationRates=utilization,
        nvmlDeviceGetComputeRunningProcesses=lambda h: [proc(42, 3), proc(77, None)] if h == 0 else [],
        nvmlDeviceGetGraphicsRunningProcesses=lambda h: [proc(42, 3)] if h == 0 else [],
    )
    mod.state = state  # type: ignore[attr-defined]
    return mod


@pytest.fixture
def proc_root(tmp_path: Path) -> Path:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cgroup").write_text(f"0::/docker/{CID}\n")
    return tmp_path


async def test_real_nvml_maps_gpus_and_processes(monkeypatch: pytest.MonkeyPatch, proc_root: Path) -> None:
    mod = stub_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    nvml = RealNvml(timeout_s=5.0, proc_root=proc_root)
    assert await nvml.gpus() == [
        GpuInfo(0, "GPU-0", "NVIDIA H100 80GB HBM3", 81920, 3072, 37),
        GpuInfo(1, "GPU-1", "NVIDIA H100 80GB HBM3", 81920, 0, None),
    ]
    assert sorted(await nvml.processes(), key=lambda p: p.pid) == [
        GpuProcess("GPU-0", 42, 3072, CID),
        GpuProcess("GPU-0", 77, None, None),
    ]
    assert nvml.status() == "ok" and mod.state["inits"] == 1  # type: ignore[attr-defined]
    await nvml.close()


async def test_real_nvml_init_failure_means_no_gpu_and_is_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = stub_pynvml(init_error=StubNvmlError("Driver Not Loaded"))
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    nvml = RealNvml(timeout_s=5.0)
    assert await nvml.gpus() == [] and await nvml.processes() == []
    assert "Driver Not Loaded" in nvml.status()
    assert mod.state["inits"] == 1  # type: ignore[attr-defined]  # not retried on every call


async def test_real_nvml_errors_after_init_are_nvml_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = stub_pynvml()

    def lost(h: int) -> None:
        raise StubNvmlError("GPU is lost")

    mod.nvmlDeviceGetMemoryInfo = lost  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    with pytest.raises(NvmlError, match="GPU is lost"):
        await RealNvml(timeout_s=5.0).gpus()


async def test_real_nvml_wedged_call_is_bounded_and_does_not_pile_up(monkeypatch: pytest.MonkeyPatch) -> None:
    block = threading.Event()
    mod = stub_pynvml(block=block)
    listed: list[int] = []  # handles whose processes the driver was asked for
    list_processes = mod.nvmlDeviceGetComputeRunningProcesses

    def counted(h: int) -> list[types.SimpleNamespace]:
        listed.append(h)
        return list_processes(h)  # type: ignore[no-any-return]

    mod.nvmlDeviceGetComputeRunningProcesses = counted  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    nvml = RealNvml(timeout_s=0.05)
    try:
        # Unbounded, the wedged call would never return: the outer bound turns that into a failure.
        with pytest.raises(NvmlTimeout, match="within 0.05 s"):
            await asyncio.wait_for(nvml.gpus(), WAIT_S)
        with pytest.raises(NvmlTimeout):  # queued behind the wedged call
            await asyncio.wait_for(nvml.processes(), WAIT_S)
    finally:
        block.set()
    nvml.timeout_s = 5.0
    assert len(await nvml.gpus()) == 2  # the driver came back: so does the adapter
    # The worker runs calls in order, so the timed-out processes() call had its turn before this
    # gpus() did: it was dropped unrun, not run late against a driver nobody waits for.
    assert listed == []
    assert len(await nvml.processes()) == 2 and listed == [0, 1]


# ---- bounds and the fake ------------------------------------------------------------


async def test_bounded_turns_a_hang_into_nvml_timeout() -> None:
    fake = FakeNvml(1, hang=True)
    nvml = bounded(fake, 0.02)
    # The fake hangs until cancelled: only the bound ends these calls, as NvmlTimeout.
    with pytest.raises(NvmlTimeout, match="within 0.02 s"):
        await asyncio.wait_for(nvml.gpus(), WAIT_S)
    with pytest.raises(NvmlTimeout, match="within 0.02 s"):
        await asyncio.wait_for(nvml.processes(), WAIT_S)
    assert fake.calls == 2
    fake.hang = False
    assert [g.uuid for g in await nvml.gpus()] == [fake_gpu(0).uuid]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_fake_release_late_lagging_and_never() -> None:
    clock = Clock()
    fake = FakeNvml(2, clock=clock, baseline_mb=300)
    gpu0, gpu1 = (g.uuid for g in await fake.gpus())
    fake.attach(gpu0, CID, 20_000)
    fake.attach(gpu1, OTHER, 1_000)
    assert [(g.uuid, g.memory_used_mb) for g in await fake.gpus()] == [(gpu0, 20_300), (gpu1, 1_300)]

    fake.detach(CID, release_after_s=0.3, memory_lag_s=0.2)
    fake.detach(OTHER, never=True)
    clock.now += 0.29
    assert {p.container_id for p in await fake.processes()} == {CID, OTHER}
    clock.now += 0.01
    assert {p.container_id for p in await fake.processes()} == {OTHER}  # exited...
    assert (await fake.gpus())[0].memory_used_mb == 20_300  # ...memory not back yet
    clock.now += 0.2
    assert (await fake.gpus())[0].memory_used_mb == 300
    clock.now += 10_000
    assert (await fake.gpus())[1].memory_used_mb == 1_300  # never
    fake.detach(OTHER)  # a kill that works
    assert await fake.processes() == [] and (await fake.gpus())[1].memory_used_mb == 300
