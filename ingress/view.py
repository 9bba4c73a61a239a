"""Each ingress's local view of the registry and the fleet.

The hot path reads only this view. It is filled on demand (one GET on a
miss), refreshed by Redis pub/sub events at once and by a short poll as a
safety net, and keeps serving what it last saw while Redis is unreachable
(``stale_s`` tells /readyz how long that has been).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import orjson
import redis.asyncio as redis

from ingress.registry import KeyRecord, Registry, hash_key
from ingress.router import ProxyState
from shared import keys
from shared.errors import not_found, unavailable
from shared.messages import VersionSpec

log = logging.getLogger("lukewarm.ingress")

T = TypeVar("T")

# After an outage, how long the last view's proxies are kept while they beat again.
RECOVERY_GRACE_S = 15.0
# How long a warm call waits for the re-read of a key it knows (Redis answers in about a millisecond).
STALE_KEY_WAIT_S = 0.25


def branch_id(customer: str, model: str, branch: str) -> str:
    return f"{customer}/{model}/{branch}"


class StateView:
    def __init__(self, registry: Registry, clock: Callable[[], float] = time.time,
                 max_staleness_s: float = 120.0, key_cache_s: float = 2.0) -> None:
        self.registry = registry
        self.clock = clock
        self.max_staleness_s = max_staleness_s
        # A deleted key stops working within 1 s by pub/sub, and within key_cache_s even when the
        # message is lost: a cached key is read again once that old.
        self.key_cache_s = key_cache_s
        self.pointers: dict[str, dict[str, int]] = {}
        self.versions: dict[str, VersionSpec] = {}
        self.keys: dict[str, tuple[KeyRecord, float]] = {}
        self.proxies: dict[str, ProxyState] = {}
        self.epochs: dict[str, int] = {}
        self.last_refresh = 0.0
        self.redis_ok = False
        self._dirty: set[str] = set()
        self._suspect_ts: dict[str, float] = {}
        self._outage_s = 0.0
        self._recovered_at = float("-inf")
        self.stopping = False  # the events listener checks it: a cancellation alone may be swallowed
        self.changed = asyncio.Event()

    # ---- reads on the hot path ----------------------------------------------------

    async def _from_redis(self, what: str, pending: Awaitable[T]) -> T:
        try:
            return await pending
        except (redis.RedisError, OSError) as exc:
            self.redis_ok = False
            raise unavailable(f"registry unreachable while reading {what}: {type(exc).__name__}", 2) from None

    async def api_key(self, key: str) -> KeyRecord | None:
        """The key's record, read again once cached longer than ``key_cache_s``; None when unknown.

        While Redis is unreachable a known key keeps working (nobody can revoke it meanwhile either).
        """
        digest = hash_key(key)
        now = self.clock()
        cached = self.keys.get(digest)
        if cached is not None and (now - cached[1] < self.key_cache_s or not self.redis_ok):
            return cached[0]  # fresh, or Redis known down: no warm call waits on it (the poll sees it back)
        try:
            pending = self.registry.lookup_key(key)
            # A known key's re-read is bounded: a Redis failing over must not stall warm calls on retries.
            record = await (asyncio.wait_for(pending, STALE_KEY_WAIT_S) if cached is not None else pending)
        except TimeoutError:
            assert cached is not None
            return cached[0]  # slow, not down: read again on the next call
        except (redis.RedisError, OSError) as exc:
            self.redis_ok = False
            if cached is not None:
                return cached[0]
            raise unavailable(f"registry unreachable while reading an API key: {type(exc).__name__}", 2) from None
        if record is None:
            self.keys.pop(digest, None)
        else:
            self.keys[digest] = (record, now)
        return record

    async def branch_pointers(self, customer: str, model: str, branch: str) -> dict[str, int]:
        bid = branch_id(customer, model, branch)
        found = self.pointers.get(bid)
        if found is None:
            found = await self._from_redis("pointers", self.registry.get_pointers(customer, model, branch))
            if found:
                self.pointers[bid] = found
        return found

    async def resolve(self, customer: str, model: str, branch: str, pointer: str) -> VersionSpec:
        """The version a pointer (``46``, ``latest`` or an alias) names; 404 when none."""
        if pointer.isascii() and pointer.isdigit():
            number = int(pointer)
        else:
            pointers = await self.branch_pointers(customer, model, branch)
            if pointer not in pointers:
                if not pointers:
                    raise not_found(f"no model {model!r} with branch {branch!r}")
                raise not_found(f"model {model!r} branch {branch!r} has no version or alias {pointer!r}")
            number = pointers[pointer]
        return await self.version(customer, model, branch, number)

    async def version(self, customer: str, model: str, branch: str, number: int) -> VersionSpec:
        vid = f"{branch_id(customer, model, branch)}/{number}"
        spec = self.versions.get(vid)
        if spec is None:
            spec = await self._from_redis("a version", self.registry.get_version(customer, model, branch, number))
            if spec is None:
                raise not_found(f"model {model!r} branch {branch!r} has no version {number}")
            self.versions[vid] = spec
        if spec.retired:
            raise not_found(f"version {number} of model {model!r} is retired")
        return spec

    def suspect(self, proxy_id: str) -> None:
        """A proxy refused a connection: route around it until a newer heartbeat comes."""
        state = self.proxies.pop(proxy_id, None)
        if state is not None:
            self._suspect_ts[proxy_id] = state.ts

    def live_proxies(self) -> list[ProxyState]:
        return list(self.proxies.values())

    def routing_now(self) -> float:
        """The time to judge heartbeats' age by.

        While Redis is unreachable no heartbeat can arrive, so ages are taken
        as of the last successful refresh: warm routes keep being served from
        the last view, for at most ``max_staleness_s``; past that the fleet
        ages out as usual.
        """
        now = self.clock()
        if self.redis_ok:
            return now - self._outage_s if self._recovering(now) else now
        if not self.last_refresh or now - self.last_refresh > self.max_staleness_s:
            return now
        return self.last_refresh

    def stale_s(self) -> float:
        return self.clock() - self.last_refresh if self.last_refresh else float("inf")

    # ---- updates -------------------------------------------------------------------

    def note_pointers(self, customer: str, model: str, branch: str, pointers: dict[str, int]) -> None:
        """What this ingress just wrote: visible here before the event comes back."""
        self.pointers[branch_id(customer, model, branch)] = dict(pointers)

    def forget_version(self, key: str) -> None:
        self.versions.pop(key, None)

    def resync(self) -> None:
        """Forget what events would have told us: keys and versions are read again, pointers refreshed."""
        self.keys.clear()
        self.versions.clear()
        self._dirty.update(self.pointers)
        self.changed.set()

    def apply_event(self, raw: bytes) -> None:
        try:
            message = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        if not isinstance(message, dict):
            return
        kind = message.get("kind")
        if kind == "pointers":
            self._dirty.add(str(message.get("branch")))
        elif kind == "version":
            self.forget_version(str(message.get("key")))
        elif kind == "key":
            self.keys.pop(str(message.get("hash")), None)
        self.changed.set()

    def _recovering(self, now: float) -> bool:
        return now - self._recovered_at < RECOVERY_GRACE_S

    def apply_heartbeats(self, beats: list[dict[str, object]], keep_missing: bool = False) -> None:
        """Take the fleet as heartbeats describe it, ignoring any older than an epoch already seen.

        ``keep_missing`` keeps known proxies that have no heartbeat now (just after an outage).
        """
        fresh: dict[str, ProxyState] = dict(self.proxies) if keep_missing else {}
        for beat in beats:
            try:
                state = ProxyState.from_heartbeat(beat)  # type: ignore[arg-type]
            except (KeyError, TypeError, ValueError):
                continue
            if state.epoch < self.epochs.get(state.proxy_id, 0):
                continue  # a fenced-off process of an older start
            if state.ts <= self._suspect_ts.get(state.proxy_id, -1.0):
                continue  # the heartbeat of a proxy that refused us, not renewed since
            self.epochs[state.proxy_id] = state.epoch
            fresh[state.proxy_id] = state
        self.proxies = fresh

    async def refresh(self) -> None:
        """One poll: the fleet, then dirty and cached pointers. Raises when Redis is unreachable."""
        try:
            beats = await self.registry.list_proxies()
            now = self.clock()
            if not self.redis_ok and self.last_refresh and now - self._recovered_at > RECOVERY_GRACE_S:
                # Back after an outage: proxies could not beat meanwhile and their keys
                # expired. Until they beat again, judge the last view as of its time.
                self._outage_s, self._recovered_at = now - self.last_refresh, now
            self.apply_heartbeats(beats, keep_missing=self._recovering(now))
            branches = set(self.pointers) | self._dirty
            self._dirty = set()
            for bid in branches:
                customer, model, branch = bid.split("/", 2)
                self.pointers[bid] = await self.registry.get_pointers(customer, model, branch)
        except (redis.RedisError, OSError):
            self.redis_ok = False
            raise
        self.redis_ok = True
        self.last_refresh = self.clock()

    async def listen(self, client: redis.Redis, on_event: Callable[[], None]) -> None:
        """Follow the events channel until cancelled; reconnects with a bounded backoff."""
        backoff_s = 0.1
        while not self.stopping:
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(keys.EVENTS_CHANNEL)
                # Messages sent while we were away are lost: what they could have changed is read again.
                self.resync()
                backoff_s = 0.1
                while not self.stopping:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self.apply_event(message["data"])
                        on_event()
            except (redis.RedisError, OSError) as exc:
                log.debug("events channel: %s", exc)
                self.redis_ok = False
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 2.0)
            finally:
                try:
                    await asyncio.wait_for(pubsub.aclose(), 1.0)
                except (redis.RedisError, OSError, TimeoutError):
                    pass
