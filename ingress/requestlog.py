"""Recent requests per branch (with the model's stdout/stderr), written off the hot path.

Records queue in memory and a background loop flushes them to Redis in one
pipeline; a full queue (by count and by bytes: during a Redis outage it is all
that holds them) drops the oldest records rather than block answers.
"""
from __future__ import annotations

import collections
import logging
from typing import Any

import redis.asyncio as redis

from ingress.registry import Registry
from shared import keys

log = logging.getLogger("lukewarm.ingress")

MAX_QUEUED = 10_000
MAX_QUEUED_BYTES = 64 * 2**20
MAX_TEXT = 64 * 1024  # per stream per record: logs are for reading, not archiving


def clip(text: str | None) -> str | None:
    if text is None or len(text) <= MAX_TEXT:
        return text
    return text[:MAX_TEXT] + f"\n… ({len(text) - MAX_TEXT} more characters)"


def _size(record: dict[str, Any]) -> int:
    """Roughly what a record holds in memory: its texts, and a little for the rest."""
    return 256 + sum(len(v) for v in record.values() if isinstance(v, str))


class RequestLog:
    def __init__(self, registry: Registry, max_records: int = MAX_QUEUED, max_bytes: int = MAX_QUEUED_BYTES) -> None:
        self.registry = registry
        self.max_records = max_records
        self.max_bytes = max_bytes
        self._queue: collections.deque[tuple[str, dict[str, Any], int]] = collections.deque()
        self._bytes = 0
        self.dropped = 0

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def add(self, customer: str, model: str, branch: str, record: dict[str, Any]) -> None:
        for field in ("stdout", "stderr", "traceback"):
            if field in record:
                record[field] = clip(record[field])
        size = _size(record)
        self._queue.append((keys.request_logs(customer, model, branch), record, size))
        self._bytes += size
        self._trim()

    def _trim(self) -> None:
        while self._queue and (len(self._queue) > self.max_records or self._bytes > self.max_bytes):
            self._bytes -= self._queue.popleft()[2]
            self.dropped += 1

    async def flush(self) -> int:
        if not self._queue:
            return 0
        batch = list(self._queue)
        self._queue.clear()
        self._bytes = 0
        try:
            await self.registry.append_logs([(key, record) for key, record, _ in batch])
        except (redis.RedisError, OSError) as exc:
            # Put them back before what came meanwhile, dropping the oldest past the bounds; next round.
            self._queue.extendleft(reversed(batch))
            self._bytes += sum(size for *_, size in batch)
            self._trim()
            log.warning("request logs not written yet: %s", exc)
            return 0
        return len(batch)
