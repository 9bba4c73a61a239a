"""The daemons' Python heap on transparent huge pages, its frontier faulted in ahead of use, off the loop.

Why (issue 14): the ingress's loop wakes once a poll and touches memory it left alone since the last one.
Where the machine charges for that per 4 KiB page (a hypervisor that drops its mappings of idle guest
memory: on the 2-vCPU VM the fleet bench runs on, 1.4-17 µs a page after 1 s asleep against 0.05 µs back
to back), the heartbeat intake's steps took 2-4.5 ms instead of under 1. On 2 MiB pages the same heap is
a few dozen mappings instead of thousands (0.25 µs a 4 KiB page's worth after 1 s asleep, there).

How: a daemon's ``__main__`` calls ``exec_on_huge_heap`` first thing; it starts the same command again
(same pid) with

- ``PYTHONMALLOC=malloc``: every object on glibc's heap instead of pymalloc's 1 MiB arenas, which the
  kernel cannot back with huge pages (not 2 MiB aligned);
- ``GLIBC_TUNABLES``: ``hugetlb=1`` (glibc madvises its heap ``MADV_HUGEPAGE``: the kernel's ``madvise``
  mode suffices, nothing system-wide changes); ``top_pad`` ``FRONTIER_BYTES`` (each time the heap grows,
  it maps that much beyond what was asked); ``trim_threshold`` 64 MiB (memory freed at the top is kept,
  not given back to be faulted in again); ``mmap_threshold`` 32 MiB (buffers up to that come from the
  heap, not from fresh mappings faulted in on every use).

A huge page's first touch zeroes 2 MiB at once (0.65-5 ms on that VM: the host backs it on demand), which
would land in whatever callback grew the heap. ``HeapFrontier`` prevents it. At start-up, before the
daemon serves, its ``settle`` grows the heap by a reserve (half the heap so far, at least
``FRONTIER_BYTES``: an ingress's working set still grows after its first poll, by ~34 MB within seconds at
5000 proxies in ``loadtests.fleet_scale``) and faults all of it in, the trim threshold raised so that it
stays; then every ``FRONTIER_EVERY_S`` a worker thread faults in (``MADV_POPULATE_WRITE``, Linux 5.14+)
the heap's last ``FRONTIER_BYTES``, which ``top_pad`` keeps ahead of what is in use whenever the heap
grows again. The costs: that much more resident memory per daemon, and glibc's allocator is slower than
pymalloc where objects churn (a heartbeat applied at 5000 proxies: ~80 µs against ~65).

``LUKEWARM_HUGE_PAGES=0`` keeps the heap on 4 KiB pages. Whoever set ``PYTHONMALLOC`` or glibc's
``hugetlb`` tunable themselves keeps their choice; a kernel with THP ``never`` is left alone.
"""
from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import errno
import functools
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

HUGE_PAGES_ENV = "LUKEWARM_HUGE_PAGES"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
HUGETLB = "glibc.malloc.hugetlb"
FRONTIER_BYTES = 16 << 20
FRONTIER_EVERY_S = 1.0
TRIM_THRESHOLD = 64 << 20
TUNABLES = (f"{HUGETLB}=1", f"glibc.malloc.top_pad={FRONTIER_BYTES}", f"glibc.malloc.trim_threshold={TRIM_THRESHOLD}",
            f"glibc.malloc.mmap_threshold={32 << 20}")
MADV_POPULATE_WRITE = 23  # linux/mman.h
M_TRIM_THRESHOLD = -1  # malloc.h
# Below the mmap threshold: a bigger block would be a mapping of its own, gone again when freed.
RESERVE_PIECE = 8 << 20
PAGE = 4096
_OFF = ("0", "false", "no", "off")


def thp_mode(setting: str) -> str:
    """The kernel's transparent-huge-page mode from its sysfs line: ``always [madvise] never`` → ``madvise``."""
    start, end = setting.find("["), setting.find("]")
    return setting[start + 1:end] if 0 <= start < end else ""


def huge_heap_env(environ: Mapping[str, str], mode: str) -> dict[str, str] | None:
    """The environment to start this daemon again with, its heap on huge pages; None when it runs so
    already, cannot (THP off) or must not (switched off, or the allocator chosen by whoever started it)."""
    if environ.get(HUGE_PAGES_ENV, "1").strip().lower() in _OFF or mode not in ("always", "madvise"):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "PYTHONMALLOC" in environ or f"{HUGETLB}=" in tunables:
        return None  # our own environment after the exec, or someone's choice: theirs stands
    return {**environ, "PYTHONMALLOC": "malloc", "GLIBC_TUNABLES": ":".join(filter(None, (tunables, *TUNABLES)))}


def on_huge_heap(environ: Mapping[str, str]) -> bool:
    """Whether a process with this environment runs on the heap ``huge_heap_env`` sets up."""
    return environ.get("PYTHONMALLOC") == "malloc" and f"{HUGETLB}=1" in environ.get("GLIBC_TUNABLES", "").split(":")


def exec_on_huge_heap() -> None:
    """Start this daemon again with its heap on huge pages (see the module's docstring), or return.
    Only from a daemon's ``__main__`` guard, before anything starts: ``exec`` replaces the process."""
    try:
        mode = thp_mode(THP_SETTING.read_text())
    except OSError:
        return
    env = huge_heap_env(os.environ, mode)
    if env is None:
        return
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError as exc:  # the daemon still runs, as before, on 4 KiB pages (logging is not set up yet)
        print(f"lukewarm: heap stays on 4 KiB pages: could not start again: {exc}", file=sys.stderr)


def heap_bounds(maps: str) -> tuple[int, int] | None:
    """Start and end (the program break) of the ``[heap]`` mapping in a ``/proc/<pid>/maps`` text."""
    for line in maps.splitlines():
        if line.endswith("[heap]"):
            start, _, end = line.split(" ", 1)[0].partition("-")
            return int(start, 16), int(end, 16)
    return None


def frontier(bounds: tuple[int, int], size: int) -> tuple[int, int]:
    """The heap's last ``size`` bytes (page-aligned start, length): where it grows into next."""
    start, end = bounds
    lo = max(start, end - size) & ~(PAGE - 1)
    return lo, end - lo


def reserve_size(heap_bytes: int, frontier_bytes: int = FRONTIER_BYTES) -> int:
    """The free heap held resident ahead of use from start-up: half the heap so far, at least the frontier."""
    return max(frontier_bytes, heap_bytes // 2)


@functools.cache  # once per process: the keeper's round calls it every second
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.malloc.argtypes, libc.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc


def populate_frontier(size: int = FRONTIER_BYTES) -> bool:
    """Fault in the heap's last ``size`` bytes now: blocking (a syscall that zeroes what it faults in), so a
    worker thread's job once the loop runs. False when this process has no heap mapping."""
    bounds = heap_bounds(Path("/proc/self/maps").read_text())
    if bounds is None:
        return False
    addr, length = frontier(bounds, size)
    if _libc().madvise(addr, length, MADV_POPULATE_WRITE) != 0:
        raise OSError(ctypes.get_errno(), "madvise(MADV_POPULATE_WRITE) on the heap's frontier")
    return True


def grow_heap(size: int, keep_free: int) -> None:
    """Grow the heap by about ``size`` bytes of free memory at its top and keep up to ``keep_free`` there
    (glibc's trim threshold): allocated in pieces, then freed; ``populate_frontier`` faults it in."""
    libc = _libc()
    libc.mallopt(M_TRIM_THRESHOLD, min(keep_free, 2**31 - 1))
    blocks = [libc.malloc(RESERVE_PIECE) for _ in range(max(1, size // RESERVE_PIECE))]
    for block in blocks:
        libc.free(block)  # free(NULL) is a no-op: a refused piece costs nothing


@dataclasses.dataclass
class HeapFrontier:
    """Keeps the heap's frontier resident (``populate_frontier``), on the huge heap only: its ``settle`` once
    before serving, its ``run_round`` from a ``shared.background.Periodic`` every ``FRONTIER_EVERY_S``."""

    size: int = FRONTIER_BYTES
    active: bool = dataclasses.field(default_factory=lambda: on_huge_heap(os.environ))
    rounds: int = 0

    def _round(self, size: int) -> None:
        if not self.active:
            return
        try:
            populate_frontier(size)
            self.rounds += 1
        except OSError as exc:
            if exc.errno == errno.ENOMEM:  # the heap shrank under the read of its bounds: next round
                log.debug("heap frontier round skipped: %s", exc)
                return
            self._give_up(exc)

    def _give_up(self, exc: OSError) -> None:
        # A kernel before 5.14 (EINVAL), or /proc hidden: the heap still lies on huge pages, faulted on use.
        self.active = False
        log.warning("heap frontier not kept resident: %s", exc)

    def settle(self) -> None:
        """Once, before the daemon serves: the reserve grown and faulted in (on this thread: nothing waits)."""
        if not self.active:
            return
        try:
            bounds = heap_bounds(Path("/proc/self/maps").read_text())
        except OSError as exc:
            self._give_up(exc)
            return
        reserve = reserve_size(bounds[1] - bounds[0] if bounds else 0, self.size)
        # Never below the threshold the exec set: the reserve and the frontier on top of it stay.
        grow_heap(reserve, keep_free=max(TRIM_THRESHOLD, reserve + 2 * self.size))
        self._round(reserve + self.size)

    async def run_round(self) -> None:
        if self.active:
            await asyncio.to_thread(self._round, self.size)
