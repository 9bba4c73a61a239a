"""Reading the fleet's heartbeats from Redis in bounded pieces: what the view's poll sends.

Two reads, each costing Redis O(log N + page) and the ingress one small reply to parse, whatever the
fleet (never a scan, never one reply holding every heartbeat):

- ``scores``: the ``lw:proxies`` sorted set (proxy id → its last heartbeat's ``ts``), from a floor up,
  in pages of ``SCORE_PAGE``: which proxies beat since the view last read them;
- ``fetch``: the heartbeat values of up to ``BEAT_PAGE`` proxies (one MGET).

Both are commands the ingress's Redis user already has (ZRANGE, MGET: deploy/redis-acl.conf).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import redis.asyncio as redis

from shared import keys

SCORE_PAGE = 128
BEAT_PAGE = 32


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def scores(client: redis.Redis, floor: float) -> dict[str, float]:
    """Every proxy whose last heartbeat score is at least ``floor``: proxy id → score.

    Paged by score, so that entries moving up while we read (a proxy beating) are read again rather
    than skipped; each page starts at the previous page's last score, past the entries read there.
    """
    out: dict[str, float] = {}
    low: float | str = floor
    offset = 0
    while True:
        page: list[Any] = list(await client.zrange(keys.PROXIES, low, "+inf", byscore=True, offset=offset,
                                                   num=SCORE_PAGE, withscores=True))
        for member, score in page:
            out[_text(member)] = float(score)
        if len(page) < SCORE_PAGE:
            return out
        last = float(page[-1][1])
        same = sum(1 for entry in page if float(entry[1]) == last)
        offset = offset + same if last == low else same
        low = last


def pages(ids: Sequence[str], size: int = BEAT_PAGE) -> Iterator[Sequence[str]]:
    for i in range(0, len(ids), size):
        yield ids[i:i + size]


async def fetch(client: redis.Redis, ids: Sequence[str]) -> list[bytes | None]:
    """The heartbeats of ``ids`` (raw JSON), None where the key expired or was withdrawn."""
    if not ids:
        return []
    raws: list[Any] = await client.mget([keys.proxy_heartbeat(pid) for pid in ids])
    return raws
