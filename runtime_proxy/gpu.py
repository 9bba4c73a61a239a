"""GPU occupancy: at most one GPU model per GPU, swapped without overlap.

``choose_gpu`` is the pure decision (use, take, evict or wait) from plain
slots and ``now``. ``GpuCoordinator`` applies it: to evict, it stops the
holder (pausing keeps GPU memory), waits (bounded) until NVML shows the
holder's processes gone and the memory back, kills the holder if not, and
only then hands the GPU to the new version. A model stays at least
``min_residency_s`` so alternating requests do not thrash; a request that
would wait past its deadline gets ``GpuBusy`` (503 + Retry-After).

One swap per GPU at a time: a swap is a task owned by its slot, and a slot
with a swap running is busy for every decision. The swap runs to its end
even when the request that started it gives up at its deadline, so the
next request finds the GPU free.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from runtime_proxy.nvml import DEFAULT_TIMEOUT_S, GpuInfo, GpuProcess, Nvml, NvmlError, bounded
from shared.errors import NoCapacity

log = logging.getLogger("lukewarm.proxy.gpu")

USE, TAKE, EVICT, WAIT = "use", "take", "evict", "wait"

HolderCall = Callable[[str], Awaitable[None]]


class GpuBusy(NoCapacity):
    """Every GPU is held and none can be freed before the request's deadline."""

    def __init__(self, retry_after_s: float, message: str = "every GPU on this host is busy") -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message, "gpu_busy", retry_after_s=math.ceil(retry_after_s))


class NoGpuAvailable(NoCapacity):
    """A GPU version asked a host that has no GPU."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("this host has no GPU" + (f" ({detail})" if detail else ""), "no_gpu")


# ---- the pure decision ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GpuSlot:
    """One GPU as the decision sees it.

    ``version_key`` None is a free GPU; a free GPU with a ``container`` still
    drains the memory of its last holder. ``since``: when the holder got the
    GPU. ``last_used``: its last request (None: ``since``).
    """

    uuid: str
    version_key: str | None
    container: str | None
    since: float
    in_flight: int
    last_used: float | None = None


@dataclasses.dataclass(frozen=True)
class Decision:
    """``use``/``take``/``evict`` GPU ``uuid``, or ``wait``; for ``wait``, ``ready_at`` is the
    earliest time a GPU may be evicted (None: every holder is busy, no time known)."""

    action: str
    uuid: str | None = None
    ready_at: float | None = None


def choose_gpu(slots: Sequence[GpuSlot], version_key: str, now: float, min_residency_s: float) -> Decision:
    """Where ``version_key`` may run: the GPU it holds, else a free one (drained ones first),
    else the idle holder resident at least ``min_residency_s`` used least recently, else wait."""
    for slot in slots:
        if slot.version_key == version_key:
            return Decision(USE, slot.uuid)
    free = [s for s in slots if s.version_key is None]
    if free:
        return Decision(TAKE, min(free, key=lambda s: s.container is not None).uuid)
    idle = [s for s in slots if s.in_flight == 0]
    ready = [s for s in idle if now - s.since >= min_residency_s]
    if ready:
        return Decision(EVICT, min(ready, key=lambda s: (_last_used(s), s.since)).uuid)
    if idle:
        return Decision(WAIT, ready_at=min(s.since + min_residency_s for s in idle))
    return Decision(WAIT)


def _last_used(slot: GpuSlot) -> float:
    return slot.since if slot.last_used is None else slot.last_used


# ---- the coordinator ----------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Slot:
    uuid: str
    version_key: str | None = None
    container: str | None = None
    since: float = 0.0
    draining: str | None = None  # a former holder's container whose memory may not be back yet
    swap: asyncio.Task[None] | None = None
    swap_started: float = 0.0


def _no_usage(version_key: str) -> tuple[int, float | None]:
    return 0, None


def _same_container(a: str | None, b: str) -> bool:
    # Docker ids may come short (12 hex) or full (64 hex).
    return a is not None and (a.startswith(b) or b.startswith(a))


class GpuCoordinator:
    """Which version holds which GPU on this host, and safe swaps between them.

    Runs on the event loop. Every NVML call is bounded (``nvml_timeout_s``)
    and a timeout counts as "not released yet"; ``stop_holder`` and
    ``kill_holder`` are bounded by ``holder_timeout_s`` and their errors are
    logged, not raised: the release check after them is what counts.
    ``usage(version_key) -> (in_flight, last_used)`` tells which holders are idle.
    """

    def __init__(
        self, nvml: Nvml, clock: Callable[[], float] = time.monotonic, min_residency_s: float = 30.0,
        release_timeout_s: float = 15.0, *, usage: Callable[[str], tuple[int, float | None]] = _no_usage,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep, poll_s: float = 0.1,
        nvml_timeout_s: float = DEFAULT_TIMEOUT_S, holder_timeout_s: float = 30.0, kill_grace_s: float = 5.0,
        baseline_mb: int = 512, claim_grace_s: float = 120.0, busy_retry_s: float = 1.0,
    ) -> None:
        self.nvml = bounded(nvml, nvml_timeout_s)
        self.clock = clock
        self.min_residency_s = min_residency_s
        self.release_timeout_s = release_timeout_s
        self.usage = usage
        self.sleep = sleep
        self.poll_s = poll_s
        self.holder_timeout_s = holder_timeout_s
        self.kill_grace_s = kill_grace_s
        self.baseline_mb = baseline_mb  # memory a GPU shows with no process of ours (driver, contexts)
        self.claim_grace_s = claim_grace_s  # a GPU handed out but never given a container is freed after this
        self.busy_retry_s = busy_retry_s
        self._slots: dict[str, _Slot] = {}
        self._gpus: dict[str, GpuInfo] = {}

    # ---- public API -------------------------------------------------------------

    async def acquire(self, version_key: str, deadline: float, stop_holder: HolderCall, kill_holder: HolderCall) -> str:
        """The uuid of a GPU that ``version_key`` now holds and that is free of other models.

        May stop (then kill) another version's container first. Raises
        ``GpuBusy`` when that cannot happen by ``deadline`` (a swap it started
        goes on), ``NoGpuAvailable`` on a host without GPUs.
        """
        await self._refresh()
        if not self._slots:
            raise NoGpuAvailable(self.nvml.status())
        while True:
            now = self.clock()
            self._drop_unclaimed(now)
            decision = choose_gpu(self._views(), version_key, now, self.min_residency_s)
            if decision.action == WAIT:
                await self._wait_turn(decision, now, deadline)
                continue
            assert decision.uuid is not None
            slot = self._slots[decision.uuid]
            if decision.action == EVICT:
                self._start_swap(slot, version_key, stop_holder, kill_holder)
            elif decision.action == TAKE:
                self._take(slot, version_key, kill_holder)
            await self._wait_swap(slot, deadline)
            return slot.uuid

    def note_container(self, version_key: str, container_id: str) -> None:
        """The container now running ``version_key`` on its GPU (once it exists)."""
        for slot in self._slots.values():
            if slot.version_key == version_key:
                slot.container = container_id
                return
        log.warning("container %s of %s noted, but it holds no GPU", container_id[:12], version_key)

    def release(self, version_key: str) -> None:
        """``version_key``'s replica went away: its GPU is free once its memory is back."""
        for slot in self._slots.values():
            if slot.version_key == version_key and slot.swap is None:
                slot.version_key, slot.draining, slot.container = None, slot.container, None

    def adopt(self, version_key: str, gpu_uuid: str, container_id: str) -> None:
        """Record a holder found at start-up (a proxy restart re-adopts containers)."""
        slot = self._slots.setdefault(gpu_uuid, _Slot(gpu_uuid))
        slot.version_key, slot.container, slot.since = version_key, container_id, self.clock()

    def holder(self, gpu_uuid: str) -> str | None:
        """The version holding a GPU, if any."""
        slot = self._slots.get(gpu_uuid)
        return None if slot is None else slot.version_key

    async def snapshot(self) -> list[dict[str, Any]]:
        """Per GPU, for the heartbeat: NVML figures (the last known ones, ``stale``,
        when NVML does not answer), the holder, and memory per container."""
        stale = False
        try:
            self._remember(await self.nvml.gpus())
            processes = await self.nvml.processes()
        except NvmlError:
            stale, processes = True, []
        now = self.clock()
        return [self._gpu_entry(slot, processes, now, stale) for slot in self._slots.values()]

    async def close(self) -> None:
        """Cancel swaps in progress and wait for them."""
        tasks = [s.swap for s in self._slots.values() if s.swap is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- deciding -------------------------------------------------------------------

    def _views(self) -> list[GpuSlot]:
        views = []
        for slot in self._slots.values():
            in_flight, last_used = self.usage(slot.version_key) if slot.version_key else (0, None)
            if slot.swap is not None or (slot.version_key is not None and slot.container is None):
                in_flight = max(in_flight, 1)  # swapping, or its replica is being created
            container = slot.container if slot.version_key is not None else slot.draining
            views.append(GpuSlot(slot.uuid, slot.version_key, container, slot.since, in_flight, last_used))
        return views

    def _drop_unclaimed(self, now: float) -> None:
        for slot in self._slots.values():
            if (slot.version_key is not None and slot.container is None and slot.swap is None
                    and now - slot.since >= self.claim_grace_s):
                log.warning("GPU %s: %s never got a container; freeing it", slot.uuid, slot.version_key)
                slot.version_key = None

    async def _wait_turn(self, decision: Decision, now: float, deadline: float) -> None:
        if decision.ready_at is not None and decision.ready_at > deadline:
            raise GpuBusy(decision.ready_at - now, "every GPU holds a model loaded too recently to swap out")
        if now >= deadline:
            retry_s = self.busy_retry_s if decision.ready_at is None else decision.ready_at - now
            raise GpuBusy(retry_s, "every GPU holds a busy model")
        await self.sleep(min(self.poll_s, deadline - now))

    # ---- swapping -------------------------------------------------------------------

    def _take(self, slot: _Slot, version_key: str, kill_holder: HolderCall) -> None:
        slot.version_key, slot.container, slot.since = version_key, None, self.clock()
        if slot.draining is not None:
            self._spawn(slot, self._drain(slot, slot.draining, None, kill_holder))

    def _start_swap(self, slot: _Slot, version_key: str, stop_holder: HolderCall, kill_holder: HolderCall) -> None:
        old = slot.container
        assert old is not None, "a holder without a container is never evicted"
        log.info("GPU %s: swapping %s (%s) out for %s", slot.uuid, slot.version_key, old[:12], version_key)
        slot.version_key, slot.container, slot.since = version_key, None, self.clock()
        self._spawn(slot, self._drain(slot, old, stop_holder, kill_holder))

    def _spawn(self, slot: _Slot, work: Awaitable[None]) -> None:
        slot.swap_started = self.clock()
        slot.swap = asyncio.ensure_future(work)

    async def _drain(self, slot: _Slot, old: str, stop_holder: HolderCall | None, kill_holder: HolderCall) -> None:
        """Stop ``old`` (unless already stopped), wait for its memory, kill it if it does not come back."""
        slot.draining = old
        try:
            if stop_holder is not None:
                await self._call_holder(stop_holder, old, "stop")
            if not await self._wait_released(slot.uuid, old, self.clock() + self.release_timeout_s):
                log.warning("GPU %s: %s still holds memory after %g s; killing it",
                            slot.uuid, old[:12], self.release_timeout_s)
                await self._call_holder(kill_holder, old, "kill")
                if not await self._wait_released(slot.uuid, old, self.clock() + self.kill_grace_s):
                    log.error("GPU %s: memory of %s not released even after a kill; going on",
                              slot.uuid, old[:12])
        finally:
            slot.draining, slot.swap, slot.since = None, None, self.clock()

    async def _call_holder(self, call: HolderCall, container: str, what: str) -> None:
        try:
            await asyncio.wait_for(call(container), self.holder_timeout_s)
        except Exception as exc:  # noqa: BLE001 - the release check decides what happens next
            log.warning("could not %s container %s: %s", what, container[:12], exc or type(exc).__name__)

    async def _wait_released(self, uuid: str, container: str, until: float) -> bool:
        while not await self._released(uuid, container):
            if self.clock() >= until:
                return False
            await self.sleep(self.poll_s)
        return True

    async def _released(self, uuid: str, container: str) -> bool:
        """No process of ``container`` on the GPU, and its memory back to what others hold."""
        try:
            processes = [p for p in await self.nvml.processes() if p.gpu_uuid == uuid]
            if any(_same_container(p.container_id, container) for p in processes):
                return False
            gpus = await self.nvml.gpus()
        except NvmlError as exc:
            log.info("GPU %s: %s; not released yet", uuid, exc)
            return False
        self._remember(gpus)
        gpu = next((g for g in gpus if g.uuid == uuid), None)
        others_mb = sum(p.used_memory_mb or 0 for p in processes)
        return gpu is None or gpu.memory_used_mb <= others_mb + self.baseline_mb

    async def _wait_swap(self, slot: _Slot, deadline: float) -> None:
        task = slot.swap
        while task is not None and not task.done():
            now = self.clock()
            if now >= deadline:
                eta_s = slot.swap_started + self.release_timeout_s + self.kill_grace_s - now
                raise GpuBusy(max(eta_s, self.busy_retry_s), "the GPU is still being freed for this model")
            # Wakes when the swap ends, else every poll_s to re-read the clock against the deadline.
            await asyncio.wait({task}, timeout=min(self.poll_s, deadline - now))

    # ---- NVML figures ---------------------------------------------------------------

    async def _refresh(self) -> None:
        try:
            gpus = await self.nvml.gpus()
        except NvmlError as exc:
            if not self._slots:
                raise GpuBusy(self.busy_retry_s, f"GPU state unknown: {exc}") from None
            return  # decide on the GPUs we knew
        self._remember(gpus)

    def _remember(self, gpus: list[GpuInfo]) -> None:
        self._gpus = {g.uuid: g for g in gpus}
        for g in gpus:
            self._slots.setdefault(g.uuid, _Slot(g.uuid))
        for uuid in [u for u, s in self._slots.items() if u not in self._gpus and s.version_key is None
                     and s.swap is None]:
            del self._slots[uuid]  # gone from NVML and holding nothing

    def _gpu_entry(self, slot: _Slot, processes: list[GpuProcess], now: float, stale: bool) -> dict[str, Any]:
        gpu = self._gpus.get(slot.uuid)
        containers: dict[str, int] = {}
        other_mb = 0
        for p in processes:
            if p.gpu_uuid != slot.uuid:
                continue
            if p.container_id is None:
                other_mb += p.used_memory_mb or 0
            else:
                containers[p.container_id] = containers.get(p.container_id, 0) + (p.used_memory_mb or 0)
        return {
            "uuid": slot.uuid, "index": gpu.index if gpu else None, "name": gpu.name if gpu else None,
            "memory_total_mb": gpu.memory_total_mb if gpu else None,
            "memory_used_mb": gpu.memory_used_mb if gpu else None,
            "utilization_pct": gpu.utilization_pct if gpu else None,
            "version": slot.version_key, "container": slot.container,
            "resident_s": round(now - slot.since, 3) if slot.version_key else None,
            "swapping": slot.swap is not None, "containers": containers, "other_mb": other_mb, "stale": stale,
        }
