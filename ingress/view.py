"""Each ingress's local view of the registry and the fleet.

The hot path reads only this view. It is filled on demand (one GET on a
miss), refreshed by Redis pub/sub events at once and by a short poll as a
safety net, and keeps serving what it last saw while Redis is unreachable
(``stale_s`` tells /readyz how long that has been).

The fleet is kept incrementally (``ingress/index.py``): a poll reads the
proxies' heartbeat scores in pages, fetches only the heartbeats that changed
(or that went quiet, to notice expiry), and applies each one in O(its
replicas), yielding to the loop every ``SLICE_S``: no poll holds the loop
for long, whatever the fleet. Routing reads ``candidates`` (the holders of a
version plus a few sampled hosts with room), never the whole fleet.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import orjson
import redis.asyncio as redis

from ingress import heartbeats
from ingress.index import FleetIndex
from ingress.registry import KeyRecord, Registry, hash_key
from ingress.router import ProxyState, ReplicaState
from shared import keys
from shared.errors import not_found, unavailable
from shared.heap import young_pass
from shared.messages import VersionSpec

log = logging.getLogger("lukewarm.ingress")

T = TypeVar("T")

# After an outage, how long the last view's proxies are kept while they beat again.
RECOVERY_GRACE_S = 15.0
# How long a warm call waits for the re-read of a key it knows (Redis answers in about a millisecond).
STALE_KEY_WAIT_S = 0.25
# The longest the heartbeat intake holds the loop before it yields (parsing and applying heartbeats):
# well under the 1 ms goal, because one heartbeat more than the budget runs before the check, and the
# intake runs once a second, from cold caches: on this VM a heartbeat that costs 55 µs in a tight loop
# costs 150-200 µs there (loadtests.fleet_scale; at 0.25 ms slices reached 0.67 ms).
SLICE_S = 0.00015
# Entries of a poll's score map freed between two slice checks (``_release``).
RELEASE_BATCH = 64
# A proxy whose score has not moved for this long (by this ingress's clock) has its heartbeat read
# again at each poll, so that its expiry (TTL) is seen: live proxies beat every 2 s.
QUIET_S = 5.0
# The poll reads heartbeat scores no older than this (seconds, by this ingress's clock): older ones are
# proxies long gone whose entry nobody removed (their heartbeat keys expired long ago).
FLEET_WINDOW_S = 60.0
# Cold candidates sampled per routing decision (power of d choices).
SAMPLE_D = 2
# How old a heartbeat may be and still be routed to (the dispatcher's own limit, ingress/app.py).
PROXY_MAX_AGE_S = 15.0


def _reuse(held: tuple[ReplicaState, ...], new: tuple[ReplicaState, ...]) -> tuple[ReplicaState, ...]:
    """``new``, with every replica equal in all fields to one already held replaced by the held object
    (the whole tuple when nothing changed): a beat where one replica of sixteen moved leaves fifteen new
    objects to die young instead of replacing long-lived ones (shared/heap.py: what the collector walks)."""
    if held == new:
        return held
    kept: dict[ReplicaState, list[ReplicaState]] = {}
    for r in held:
        kept.setdefault(r, []).append(r)
    out = []
    for r in new:
        same = kept.get(r)
        out.append(same.pop(0) if same else r)  # twins stay two objects, in their order
    return tuple(out)


def parse_heartbeat(raw: bytes | None) -> ProxyState | None:
    """A heartbeat as read from Redis; None when it expired, was withdrawn or is malformed (skipped, as a
    full poll did)."""
    if raw is None:
        return None
    try:
        return ProxyState.from_heartbeat(orjson.loads(raw))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None


class _Turn:
    """Cooperative slicing of a long piece of work: ``tick`` yields to the loop once ``SLICE_S`` is spent."""

    __slots__ = ("end",)

    def __init__(self) -> None:
        self.end = time.perf_counter() + SLICE_S

    async def tick(self) -> None:
        if time.perf_counter() > self.end:
            await self.now()

    async def now(self) -> None:
        await asyncio.sleep(0)
        # The slice's new states, before churn lets them pile up (shared/heap.py); in a step of its own,
        # so that the loop is held for a slice or a pass, never both.
        young_pass()
        await asyncio.sleep(0)
        self.end = time.perf_counter() + SLICE_S


async def _release(items: dict[str, float], turn: _Turn) -> None:
    """Empties ``items`` a slice at a time. A poll's score map (one id and one float per live proxy, made
    anew each poll) was otherwise freed in one step as the poll returned: 0.5-0.7 ms of the loop at 5000
    proxies (free of 10 000 objects, on memory the poll built a second ago), the longest step left."""
    pop = items.popitem
    while items:
        for _ in range(min(len(items), RELEASE_BATCH)):
            pop()
        await turn.tick()


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
        self._fleet = FleetIndex()
        self.epochs: dict[str, int] = {}
        # proxy id → (the score its heartbeat was last read at, when by this clock): what changed since.
        self._fetched: dict[str, tuple[float, float]] = {}
        self._refreshing = asyncio.Lock()
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

    @property
    def proxies(self) -> FleetIndex:
        """proxy id → its last heartbeat; a mapping that keeps the routing index right on every write."""
        return self._fleet

    @proxies.setter
    def proxies(self, value: dict[str, ProxyState]) -> None:
        self._fleet.clear()
        self._fleet.update(value)

    def live_proxies(self) -> list[ProxyState]:
        """Every proxy in the view: O(fleet). Not for the request path: there, ``candidates``."""
        return list(self._fleet.values())

    def candidates(self, version_key: str, rng: random.Random, d: int = SAMPLE_D, now: float | None = None,
                   max_age_s: float = PROXY_MAX_AGE_S, exclude: frozenset[str] = frozenset(),
                   cold_if_busy: bool = False) -> list[ProxyState]:
        """What ``choose_proxies`` needs to rank for ``version_key``: every proxy holding a replica of it
        (warm or lukewarm, not excluded) and up to ``d`` live proxies with room sampled at random (cold
        candidates: power of d choices). O(holders + d), whatever the fleet.

        ``now`` defaults to ``routing_now()``; a caller wanting ``count`` distinct proxies (a pre-warm)
        passes ``d=count``. ``cold_if_busy``: no cold candidates when a live holder has a warm slot free
        (``FleetIndex.candidates``). Never empty while a live proxy outside ``exclude`` is in the view.
        """
        when = self.routing_now() if now is None else now
        return self._fleet.candidates(version_key, rng, d, when, max_age_s, exclude, cold_if_busy)

    def running_of(self, version_key: str) -> int:
        """Replicas of ``version_key`` running or starting across the fleet (as of the last heartbeats),
        what capacity.max is judged by: O(holders)."""
        return self._fleet.running_of(version_key)

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

        ``keep_missing`` keeps known proxies that have no heartbeat now (just after an outage). A whole
        snapshot at once (tests, tools): the poll applies only what changed (``refresh``).
        """
        present: set[str] = set()
        for beat in beats:
            try:
                state = ProxyState.from_heartbeat(beat)  # type: ignore[arg-type]
            except (KeyError, TypeError, ValueError):
                continue
            if self._take(state):
                present.add(state.proxy_id)
        if not keep_missing:
            for pid in [pid for pid in self._fleet if pid not in present]:
                del self._fleet[pid]

    def _take(self, state: ProxyState) -> bool:
        """One heartbeat into the view, O(its replicas); False when it is ignored: the caller then leaves
        the proxy out of the view, as a full poll did (unless it keeps missing proxies). ``state`` is just
        parsed and nobody else holds it yet: it is completed in place."""
        pid = state.proxy_id
        if state.epoch < self.epochs.get(pid, 0) or state.ts <= self._suspect_ts.get(pid, -1.0):
            # A fenced-off process of an older start, or the heartbeat of a proxy that refused us, not
            # renewed since.
            return False
        held = self._fleet.get(pid)
        if held is not None and held.epoch == state.epoch and held.ts > state.ts:
            return True  # a late read of an older beat of the same start (two polls interleaved)
        if held is not None:
            # Most beats of a big fleet repeat most replicas: keep the objects already held, so that
            # the new ones die young (cheap for the collector) instead of replacing long-lived ones.
            # In place, not dataclasses.replace: a copy re-runs the frozen __init__, ~5 µs a beat.
            object.__setattr__(state, "replicas", _reuse(held.replicas, state.replicas))
            if held.images == state.images:
                object.__setattr__(state, "images", held.images)
            state.inherit(held)
        self.epochs[pid] = state.epoch
        self._fleet[pid] = state
        return True

    def _take_parsed(self, pid: str, state: ProxyState | None, keep_missing: bool) -> None:
        """The heartbeat read under ``pid``'s key (``parse_heartbeat``): None when it expired, was withdrawn
        or is malformed."""
        if state is not None and state.proxy_id == pid and self._take(state):
            return
        if not keep_missing:
            self._fleet.pop(pid, None)

    async def _intake(self, scores: dict[str, float], now: float, keep_missing: bool, turn: _Turn) -> int:
        """Apply what changed in the fleet since the last poll; returns how many heartbeats were read.

        Reads only the heartbeats whose score moved (or quiet ones, to see them expire), in pages; parses
        and applies them in slices of at most ``SLICE_S`` between yields to the loop (each Redis reply
        is parsed in a step of its own, too). ``turn`` began before the scores were read: their reply's
        parse is in the first slice.
        """
        client = self.registry.redis
        wanted = []
        for pid, score in scores.items():
            seen = self._fetched.get(pid)
            if seen is None or seen[0] != score or (pid in self._fleet and now - seen[1] > QUIET_S):
                wanted.append(pid)
            await turn.tick()
        gone = []
        # A copy of the ids: the pass yields, and meanwhile a request may drop a refused proxy (``suspect``).
        for pid in list(self._fleet) if not keep_missing else ():
            if pid not in scores:
                gone.append(pid)  # withdrawn (ZREM), or silent past the window
            await turn.tick()
        for pid in gone:
            self._fleet.pop(pid, None)
        for pid in [pid for pid in self._fetched if pid not in scores]:
            del self._fetched[pid]
        for page in heartbeats.pages(wanted):
            await turn.tick()  # sending a command is a few hundred µs of redis-py from cold: not on a full slice
            raws = await heartbeats.fetch(client, page)
            await turn.now()  # the reply's parse was a step: the heartbeats' starts another
            for pid, raw in zip(page, raws):
                self._fetched[pid] = (scores[pid], now)
                state = parse_heartbeat(raw)
                # Parse and apply touch different code and data: on a VM that charges the first touch of
                # memory left idle (here ~10 µs a page after 1 s), each is a slice's worth on its own.
                await turn.tick()
                self._take_parsed(pid, state, keep_missing)
                await turn.tick()
        return len(wanted)

    async def refresh(self) -> None:
        """One poll: what changed in the fleet, then dirty and cached pointers. Raises when Redis is
        unreachable. Polls run one at a time (a caller wanting fresh heartbeats waits for the one running)."""
        async with self._refreshing:
            await self._refresh()

    async def _refresh(self) -> None:
        try:
            start = self.clock()
            turn = _Turn()
            scores = await heartbeats.scores(self.registry.redis, start - FLEET_WINDOW_S)
            now = self.clock()
            if not self.redis_ok and self.last_refresh and now - self._recovered_at > RECOVERY_GRACE_S:
                # Back after an outage: proxies could not beat meanwhile and their keys
                # expired. Until they beat again, judge the last view as of its time.
                self._outage_s, self._recovered_at = now - self.last_refresh, now
            await self._intake(scores, now, keep_missing=self._recovering(now), turn=turn)
            await _release(scores, turn)
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
