"""The request log's queue: bounded by count and by bytes, oldest dropped, kept across a Redis outage."""
from __future__ import annotations

from typing import Any

import redis.asyncio as redis

from ingress.requestlog import RequestLog


class _Registry:
    def __init__(self) -> None:
        self.down = False
        self.written: list[tuple[str, dict[str, Any]]] = []

    async def append_logs(self, entries: list[tuple[str, dict[str, Any]]]) -> None:
        if self.down:
            raise redis.ConnectionError("down")
        self.written += entries


async def test_the_queue_is_bounded_in_bytes_through_an_outage() -> None:
    registry = _Registry()
    log = RequestLog(registry, max_records=1000, max_bytes=100_000)  # type: ignore[arg-type]
    registry.down = True
    for i in range(100):
        log.add("acme", "m", "main", {"n": i, "stdout": "x" * 10_000})
        assert log.queued_bytes <= 100_000
    assert await log.flush() == 0  # Redis down: kept, still within the bound
    assert log.queued_bytes <= 100_000 and log.dropped >= 90
    registry.down = False
    assert await log.flush() > 0
    assert [r["n"] for _, r in registry.written] == list(range(100 - len(registry.written), 100))  # the newest
    assert log.queued_bytes == 0


def test_the_queue_is_bounded_in_count() -> None:
    log = RequestLog(_Registry(), max_records=5)  # type: ignore[arg-type]
    for i in range(8):
        log.add("acme", "m", "main", {"n": i})
    assert log.dropped == 3
