"""Owned background loops: whoever starts one keeps it, cancels it and awaits it."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("lukewarm")


class Periodic:
    """Runs ``fn`` every ``interval_s`` until stopped; an exception is logged, not fatal."""

    def __init__(self, name: str, interval_s: float, fn: Callable[[], Awaitable[object]]) -> None:
        self.name = name
        self.interval_s = interval_s
        self.fn = fn
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.name)

    def wake(self) -> None:
        """Run the next round now instead of at the end of the interval."""
        self._wake.set()

    async def _run(self) -> None:
        # The flag, not only the cancellation, ends the loop: on Python 3.11 wait_for
        # can swallow a cancellation that races with the wake-up.
        while not self._stopping:
            try:
                await self.fn()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a loop must outlive one bad round
                log.warning("%s: %s: %s", self.name, type(exc).__name__, exc or "(no message)")
            if self._stopping:
                break
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({waiter}, timeout=self.interval_s)
            finally:
                waiter.cancel()
            self._wake.clear()

    async def stop(self) -> None:
        task, self._task = self._task, None
        self._stopping = True
        if task is not None:
            await cancel_and_wait(task)


async def cancel_and_wait(task: asyncio.Task[object], timeout_s: float = 5.0) -> None:
    """Cancel ``task`` and wait for it, bounded: a library that swallows a
    cancellation (redis-py's pub/sub has) must not hang a shutdown."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        log.warning("%s did not stop within %.0f s of its cancellation", task.get_name(), timeout_s)
        return
    if not task.cancelled() and task.exception() is not None:
        log.warning("%s ended with %r", task.get_name(), task.exception())
