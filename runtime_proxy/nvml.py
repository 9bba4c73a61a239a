"""The NVML adapter: the one module that imports ``pynvml``.

What it guarantees: every call is bounded in time (``NvmlTimeout`` past the
bound) and never runs on the event loop; a host without a GPU, driver or
library reports no GPUs and no processes instead of raising. GPU processes
are mapped to Docker containers through ``/proc/<pid>/cgroup``, which needs
the proxy to see host PIDs (it runs on the host, under systemd).

``FakeNvml`` stands in for tests: attach/detach container memory, release
it late or never, or hang every call.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import queue
import re
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

log = logging.getLogger("lukewarm.proxy.nvml")

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 2.0
MIB = 1024 * 1024

# Docker's cgroup paths: cgroupfs driver `/docker/<id>` (v1 and v2), systemd
# driver `/system.slice/docker-<id>.scope` (v1 and v2).
_DOCKER_CGROUP = re.compile(r"(?:/docker/|/docker-)([0-9a-f]{64})(?:\.scope)?(?=/|$)")


class NvmlError(Exception):
    """An NVML call failed after NVML was up (a GPU fallen off the bus, a driver reload)."""


class NvmlTimeout(NvmlError):
    """An NVML call did not answer within its bound (a wedged driver)."""


@dataclasses.dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML reports it. Memory in MiB; utilisation None where the GPU cannot say (MIG)."""

    index: int
    uuid: str
    name: str
    memory_total_mb: int
    memory_used_mb: int
    utilization_pct: int | None


@dataclasses.dataclass(frozen=True)
class GpuProcess:
    """A process holding memory on a GPU. ``used_memory_mb`` is None where NVML cannot say;
    ``container_id`` (full 64-hex Docker id) is None for a process outside Docker."""

    gpu_uuid: str
    pid: int
    used_memory_mb: int | None
    container_id: str | None


class Nvml(Protocol):
    """What the proxy needs of NVML. Calls raise ``NvmlError`` (``NvmlTimeout`` past a bound), nothing else."""

    async def gpus(self) -> list[GpuInfo]: ...

    async def processes(self) -> list[GpuProcess]: ...

    def status(self) -> str:
        """One line for people: "ok", or why there are no GPUs."""
        ...

    async def close(self) -> None: ...


def container_id_from_cgroup(text: str) -> str | None:
    """The Docker container id in a ``/proc/<pid>/cgroup`` text, or None outside Docker."""
    for line in text.splitlines():
        path = line.split(":", 2)[-1]
        match = _DOCKER_CGROUP.search(path)
        if match:
            return match.group(1)
    return None


def container_of_pid(pid: int, proc_root: Path = Path("/proc")) -> str | None:
    """The container of a host PID; None when outside Docker, gone, or unreadable."""
    try:
        return container_id_from_cgroup((proc_root / str(pid) / "cgroup").read_text())
    except OSError:
        return None


async def within(timeout_s: float, call: Awaitable[T], what: str) -> T:
    """``call`` bounded by ``timeout_s``; past it the call is cancelled and ``NvmlTimeout`` raised."""
    try:
        return await asyncio.wait_for(call, timeout_s)
    except TimeoutError:
        raise NvmlTimeout(f"NVML {what} did not answer within {timeout_s:g} s") from None


class Bounded:
    """Any ``Nvml`` with every call bounded in time. Wrap fakes in it to test timeouts."""

    def __init__(self, inner: Nvml, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.inner = inner
        self.timeout_s = timeout_s

    async def gpus(self) -> list[GpuInfo]:
        return await within(self.timeout_s, self.inner.gpus(), "gpus")

    async def processes(self) -> list[GpuProcess]:
        return await within(self.timeout_s, self.inner.processes(), "processes")

    def status(self) -> str:
        return self.inner.status()

    async def close(self) -> None:
        try:
            await within(self.timeout_s, self.inner.close(), "close")
        except NvmlError as exc:
            log.warning("%s", exc)


def bounded(nvml: Nvml, timeout_s: float = DEFAULT_TIMEOUT_S) -> Bounded:
    """``nvml`` with every call bounded by ``timeout_s``."""
    return Bounded(nvml, timeout_s)


class NoGpu:
    """A host without GPUs: reports nothing."""

    def __init__(self, reason: str = "GPU support is off") -> None:
        self.reason = reason

    async def gpus(self) -> list[GpuInfo]:
        return []

    async def processes(self) -> list[GpuProcess]:
        return []

    def status(self) -> str:
        return self.reason

    async def close(self) -> None:
        return None


class _Worker:
    """One daemon thread that runs blocking calls in order.

    Not ``asyncio.to_thread``: a wedged NVML call would hold a thread of the
    default executor forever, pile up more with every retry, and make
    ``asyncio.run`` (and the interpreter) wait for it at exit. Here a wedged
    call blocks only later NVML calls, which time out and are dropped unrun.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    async def run(self, fn: Callable[[], T]) -> T:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((fn, future))
        self._ensure_thread()
        return await asyncio.wrap_future(future)

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            fn, future = self._queue.get()
            if not future.set_running_or_notify_cancel():
                continue  # its caller gave up while it waited behind a wedged call
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting caller
                future.set_exception(exc)


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class RealNvml:
    """NVML through nvidia-ml-py. Initialised on first use; if that fails (no driver,
    no library, no GPU) it reports no GPUs from then on, and ``status()`` says why."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, proc_root: Path = Path("/proc")) -> None:
        self.timeout_s = timeout_s
        self.proc_root = proc_root
        self._worker = _Worker("lukewarm-nvml")
        self._ready: bool | None = None  # None: not tried yet
        self._reason = "NVML not initialised yet"

    async def gpus(self) -> list[GpuInfo]:
        return await self._call(self._gpus_sync, "gpus")

    async def processes(self) -> list[GpuProcess]:
        return await self._call(self._processes_sync, "processes")

    def status(self) -> str:
        return self._reason

    async def close(self) -> None:
        if self._ready:
            try:
                await self._call(self._shutdown_sync, "shutdown")
            except NvmlError as exc:
                log.warning("%s", exc)

    async def _call(self, fn: Callable[[], T], what: str) -> T:
        try:
            return await within(self.timeout_s, self._worker.run(fn), what)
        except NvmlError:
            raise
        except Exception as exc:  # pynvml.NVMLError, kept inside this module
            raise NvmlError(f"NVML {what} failed: {type(exc).__name__}: {exc}") from exc

    # ---- in the worker thread -------------------------------------------------

    def _init_sync(self) -> bool:
        if self._ready is None:
            try:
                import pynvml

                pynvml.nvmlInit()
            except Exception as exc:  # noqa: BLE001 - any failure here means "no GPU"
                self._ready = False
                self._reason = f"NVML unavailable: {type(exc).__name__}: {exc}"
                log.info("%s", self._reason)
            else:
                self._ready = True
                self._reason = "ok"
        return self._ready

    def _handles_sync(self) -> list[tuple[int, Any]]:
        import pynvml

        if not self._init_sync():
            return []
        return [(i, pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(pynvml.nvmlDeviceGetCount())]

    def _gpus_sync(self) -> list[GpuInfo]:
        import pynvml

        out = []
        for index, handle in self._handles_sync():
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                utilization: int | None = int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except pynvml.NVMLError:
                utilization = None
            out.append(GpuInfo(
                index=index, uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                name=_text(pynvml.nvmlDeviceGetName(handle)),
                memory_total_mb=int(memory.total) // MIB, memory_used_mb=int(memory.used) // MIB,
                utilization_pct=utilization,
            ))
        return out

    def _processes_sync(self) -> list[GpuProcess]:
        import pynvml

        out: dict[tuple[str, int], GpuProcess] = {}
        for _, handle in self._handles_sync():
            uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
            found = list(pynvml.nvmlDeviceGetComputeRunningProcesses(handle))
            try:
                found += pynvml.nvmlDeviceGetGraphicsRunningProcesses(handle)
            except pynvml.NVMLError:
                pass  # not supported on every GPU; compute processes are what we serve
            for p in found:
                used = None if p.usedGpuMemory is None else int(p.usedGpuMemory) // MIB
                out.setdefault((uuid, int(p.pid)), GpuProcess(
                    gpu_uuid=uuid, pid=int(p.pid), used_memory_mb=used,
                    container_id=container_of_pid(int(p.pid), self.proc_root),
                ))
        return list(out.values())

    def _shutdown_sync(self) -> None:
        import pynvml

        pynvml.nvmlShutdown()
        self._ready = None


# ---- the fake -------------------------------------------------------------------


@dataclasses.dataclass
class _Allocation:
    gpu_uuid: str
    container_id: str
    pid: int
    mb: int
    process_gone_at: float | None = None  # None: still running
    memory_freed_at: float | None = None  # None: still held


class FakeNvml:
    """An in-memory NVML for tests. Time comes from ``clock``.

    ``attach`` puts a container's process on a GPU; ``detach`` makes it exit
    after ``release_after_s`` and its memory free ``memory_lag_s`` later, or
    never (``never=True``: a process the driver cannot reap). ``hang=True``
    makes every call block until cancelled: wrap the fake in ``bounded``.
    """

    def __init__(
        self, gpus: int | Sequence[GpuInfo] = 1, *, clock: Callable[[], float] = time.monotonic,
        baseline_mb: int = 0, hang: bool = False,
    ) -> None:
        if isinstance(gpus, int):
            gpus = [fake_gpu(i) for i in range(gpus)]
        self._gpus = list(gpus)
        self.clock = clock
        self.baseline_mb = baseline_mb
        self.hang = hang
        self.calls = 0
        self._allocations: list[_Allocation] = []
        self._pids = itertools.count(1000)

    async def gpus(self) -> list[GpuInfo]:
        await self._maybe_hang()
        return [
            dataclasses.replace(g, memory_used_mb=min(g.memory_total_mb, self.baseline_mb + self._held_mb(g.uuid)))
            for g in self._gpus
        ]

    async def processes(self) -> list[GpuProcess]:
        await self._maybe_hang()
        now = self.clock()
        return [
            GpuProcess(gpu_uuid=a.gpu_uuid, pid=a.pid, used_memory_mb=a.mb, container_id=a.container_id)
            for a in self._allocations if not _passed(a.process_gone_at, now)
        ]

    def status(self) -> str:
        return "ok" if self._gpus else "a fake NVML with no GPUs"

    async def close(self) -> None:
        return None

    def attach(self, gpu_uuid: str, container_id: str, mb: int) -> int:
        """Start a process of ``container_id`` holding ``mb`` on the GPU; its pid."""
        allocation = _Allocation(gpu_uuid=gpu_uuid, container_id=container_id, pid=next(self._pids), mb=mb)
        self._allocations.append(allocation)
        return allocation.pid

    def detach(
        self, container_id: str, release_after_s: float = 0.0, never: bool = False, memory_lag_s: float = 0.0,
    ) -> None:
        """The container's processes exit ``release_after_s`` from now and their memory is
        freed ``memory_lag_s`` later; with ``never`` both stay until a later ``detach``
        (a kill that works) overrides it."""
        now = self.clock()
        for a in self._allocations:
            if a.container_id == container_id and not _passed(a.memory_freed_at, now):
                if never:
                    a.process_gone_at = a.memory_freed_at = float("inf")
                else:
                    a.process_gone_at = now + release_after_s
                    a.memory_freed_at = now + release_after_s + memory_lag_s

    def _held_mb(self, gpu_uuid: str) -> int:
        now = self.clock()
        return sum(a.mb for a in self._allocations if a.gpu_uuid == gpu_uuid and not _passed(a.memory_freed_at, now))

    async def _maybe_hang(self) -> None:
        self.calls += 1
        if self.hang:
            await asyncio.Event().wait()


def _passed(at: float | None, now: float) -> bool:
    return at is not None and now >= at


def fake_gpu(index: int, memory_total_mb: int = 81_559, name: str = "NVIDIA H100 80GB HBM3") -> GpuInfo:
    """A plausible GPU for tests and fakes."""
    return GpuInfo(
        index=index, uuid=f"GPU-{index:08d}-0000-0000-0000-000000000000", name=name,
        memory_total_mb=memory_total_mb, memory_used_mb=0, utilization_pct=0,
    )
