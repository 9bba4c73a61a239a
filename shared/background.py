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

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.name)

    def wake(self) -> None:
        """Run the next round now instead of at the end of the interval."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await self.fn()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a loop must outlive one bad round
                log.warning("%s: %s: %s", self.name, type(exc).__name__, exc)
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            except TimeoutError:
                pass
            self._wake.clear()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
