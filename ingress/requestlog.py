"""Recent requests per branch (with the model's stdout/stderr), written off the hot path.

Records queue in memory and a background loop flushes them to Redis in one
pipeline; a full queue drops the oldest records rather than block answers.
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
MAX_TEXT = 64 * 1024  # per stream per record: logs are for reading, not archiving


def clip(text: str | None) -> str | None:
    if text is None or len(text) <= MAX_TEXT:
        return text
    return text[:MAX_TEXT] + f"\n… ({len(text) - MAX_TEXT} more characters)"


class RequestLog:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._queue: collections.deque[tuple[str, dict[str, Any]]] = collections.deque(maxlen=MAX_QUEUED)

    def add(self, customer: str, model: str, branch: str, record: dict[str, Any]) -> None:
        for field in ("stdout", "stderr", "traceback"):
            if field in record:
                record[field] = clip(record[field])
        self._queue.append((keys.request_logs(customer, model, branch), record))

    async def flush(self) -> int:
        if not self._queue:
            return 0
        batch = list(self._queue)
        self._queue.clear()
        try:
            await self.registry.append_logs(batch)
        except (redis.RedisError, OSError) as exc:
            # Put them back (the deque drops the oldest if it overflows) and try next round.
            self._queue.extendleft(reversed(batch))
            log.warning("request logs not written yet: %s", exc)
            return 0
        return len(batch)
