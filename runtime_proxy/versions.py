"""What a version runs, as the registry says: a proxy never takes image, env or limits from a request.

A chunk names a version (``customer/model/branch/n``) and the deploy time the
ingress resolved; the spec comes from Redis, cached for ``cache_s``. Versions
are immutable once deployed, so a cached spec stays right but for retirement
(re-read within ``cache_s``) and a number given back after a failed pre-warm
and reused (a different ``created_at``: read again at once). While Redis is
unreachable a cached spec keeps serving warm calls.
"""
from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

import orjson
import redis.asyncio as redis
from redis.exceptions import AuthenticationError, NoPermissionError

from shared import keys
from shared.errors import Internal, NoCapacity, not_found, unavailable
from shared.messages import VersionSpec, split_version_key

log = logging.getLogger("lukewarm.proxy")

MAX_CACHED = 10_000


class VersionSource:
    """Version specs by key, from the registry, cached (LRU, bounded)."""

    def __init__(self, client: redis.Redis, cache_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.cache_s = cache_s
        self.clock = clock
        self._cache: collections.OrderedDict[str, tuple[VersionSpec, float]] = collections.OrderedDict()

    async def get(self, key: str, created_at: float) -> VersionSpec:
        """The spec of ``key`` as deployed at ``created_at``; 404 unknown or retired, 503 when it changed."""
        now = self.clock()
        cached = self._cache.get(key)
        if cached is not None and cached[0].created_at == created_at and now < cached[1]:
            self._cache.move_to_end(key)
            return self._check(cached[0], created_at)
        try:
            raw = await self.client.get(keys.version(*split_version_key(key)))
        except (NoPermissionError, AuthenticationError) as exc:
            # Not an outage: this proxy's Redis user is set up wrong (deploy/redis-acl.conf).
            log.error("Redis refused the proxy's read of version %s: %s", key, exc)
            raise Internal("this proxy may not read the registry (see its log)") from None
        except (redis.RedisError, OSError):
            if cached is not None and cached[0].created_at == created_at:
                return self._check(cached[0], created_at)  # immutable: safe to serve through an outage
            raise unavailable("the registry is unreachable and this version is not known here yet", 2) from None
        if raw is None:
            self._cache.pop(key, None)
            raise not_found(f"no version {key}")
        try:
            spec = VersionSpec.from_dict(orjson.loads(raw))
        except (ValueError, TypeError) as exc:
            raise Internal(f"version {key} is unreadable in the registry: {exc}") from None
        self._cache[key] = (spec, now + self.cache_s)
        self._cache.move_to_end(key)
        while len(self._cache) > MAX_CACHED:
            self._cache.popitem(last=False)
        return self._check(spec, created_at)

    async def current(self, key: str) -> VersionSpec | None:
        """The registry's record of ``key`` now (cached ``cache_s``), retired ones included; None when
        there is none. Raises redis errors: a caller that cannot tell must not act."""
        now = self.clock()
        cached = self._cache.get(key)
        if cached is not None and now < cached[1]:
            return cached[0]
        raw = await self.client.get(keys.version(*split_version_key(key)))
        if raw is None:
            self._cache.pop(key, None)
            return None
        spec = VersionSpec.from_dict(orjson.loads(raw))
        self._cache[key] = (spec, now + self.cache_s)
        return spec

    @staticmethod
    def _check(spec: VersionSpec, created_at: float) -> VersionSpec:
        if spec.retired:
            raise not_found(f"version {spec.key} is retired")
        if spec.created_at != created_at:
            # The number was given back and deployed again: the caller resolved other code.
            raise NoCapacity(f"version {spec.key} was redeployed: resolve it again", "version_changed",
                             retry_after_s=1)
        return spec
