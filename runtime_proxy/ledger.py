"""At most once per proxy: a chunk id seen again within the window joins its first run or gets its answer.

An ingress re-sends a chunk when the connection to this proxy broke mid-call
(the proxy alive, the network not), and hedges a straggler; each copy names
the same ``chunk_id``. Here a copy that arrives while the first is running
waits for that run, and one that arrives after it answers gets the same
bytes, so a model with side effects is not run twice on this host.

Cancelling: a run whose every caller went away is cancelled while it still
waits for a replica (it never reaches the model). Once the model has it, it
finishes — the harness runs one call at a time, and a run cut off there would
leave the replica busy behind the proxy's back — and its answer is kept for a
copy that may still come.

Memory is bounded twice: answers are forgotten after ``window_s`` and, oldest
first, once they hold more than ``max_bytes``; an answer larger than a quarter
of that is never kept. Failures are not kept: a copy of a chunk that failed runs again.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Awaitable, Callable

MAX_ENTRIES = 100_000


@dataclasses.dataclass
class _Run:
    task: asyncio.Task[bytes]
    callers: int = 0
    started: bool = False  # the model has it: from here a cancel lets it finish


class ChunkLedger:
    """Runs by chunk id (in flight) and their answers (done), within a time and a byte bound."""

    def __init__(self, window_s: float, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.max_bytes = max_bytes
        self.clock = clock
        self._running: dict[str, _Run] = {}
        self._done: collections.OrderedDict[str, tuple[bytes, float]] = collections.OrderedDict()
        self._bytes = 0
        self.joined = 0  # copies that joined a run in flight
        self.replayed = 0  # copies answered from a finished run

    @property
    def stored_bytes(self) -> int:
        return self._bytes

    def in_flight(self) -> int:
        return len(self._running)

    async def run(self, chunk_id: str, work: Callable[[Callable[[], None]], Awaitable[bytes]]) -> tuple[bytes, bool]:
        """The answer of ``chunk_id`` and whether it is a copy's (joined or replayed). ``work`` runs the
        chunk, calling its argument once the model has it. An empty id is never de-duplicated."""
        if not chunk_id or self.window_s <= 0:
            return await work(lambda: None), False
        self._expire()
        done = self._done.get(chunk_id)
        if done is not None:
            self.replayed += 1
            return done[0], True
        entry = self._running.get(chunk_id)
        copy = entry is not None
        if entry is None:
            entry = self._start(chunk_id, work)
        else:
            self.joined += 1
        entry.callers += 1
        try:
            return await asyncio.shield(entry.task), copy
        finally:
            entry.callers -= 1
            if entry.callers == 0 and not entry.started and not entry.task.done():
                entry.task.cancel()  # nobody waits and the model never had it: drop it from the queue

    def _start(self, chunk_id: str, work: Callable[[Callable[[], None]], Awaitable[bytes]]) -> _Run:
        def started() -> None:
            entry.started = True

        async def run() -> bytes:
            return await work(started)

        entry = _Run(task=asyncio.ensure_future(run()))
        self._running[chunk_id] = entry
        entry.task.add_done_callback(lambda task: self._finished(chunk_id, task))
        return entry

    def _finished(self, chunk_id: str, task: asyncio.Task[bytes]) -> None:
        self._running.pop(chunk_id, None)
        if task.cancelled() or task.exception() is not None:  # exception() also marks it retrieved
            return
        answer = task.result()
        if len(answer) * 4 > self.max_bytes:
            return
        self._done[chunk_id] = (answer, self.clock() + self.window_s)
        self._bytes += len(answer)
        while self._done and (self._bytes > self.max_bytes or len(self._done) > MAX_ENTRIES):
            self._forget_oldest()

    def _expire(self) -> None:
        now = self.clock()
        while self._done and next(iter(self._done.values()))[1] <= now:
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        _, (answer, _) = self._done.popitem(last=False)
        self._bytes -= len(answer)

    async def close(self) -> None:
        """Wait for runs in flight (each bounded by its deadline); a stopping proxy drains them."""
        tasks = [entry.task for entry in self._running.values()]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
