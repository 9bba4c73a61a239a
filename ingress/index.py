"""The fleet, indexed for routing: who holds each version, who has room, kept up to date one heartbeat at a time.

``FleetIndex`` is the view's ``proxies`` mapping (proxy id → its last ``ProxyState``) and keeps, on every
write, what a routing decision needs so that it never scans the fleet:

- holders: version key → the proxies with a replica of it in any state, or requests waiting there for
  one (the warm, lukewarm and starting candidates); for a version held by more than ``RANKED_HOLDERS``
  proxies, the same split into the warm ones (a replica running) and the others, to draw from;
- per version, how many replicas run or start across the fleet (what capacity.max is judged by);
- two pools with O(1) add, remove and uniform pick: every proxy, and the proxies with room (fewer
  replicas than their ``max_replicas``), from which cold candidates are sampled (power of d choices).

Guarantees: a write (a heartbeat applied, a proxy dropped or suspected) costs O(replicas of that proxy),
whatever the fleet; ``candidates`` ranks at most ``RANKED_HOLDERS`` holders and ``d`` sampled hosts,
however many proxies hold the version (a version held by more has its ids copied, in C, to draw from);
``running_of`` is one lookup. Reads are pure: the index changes only through the mapping's own writes.
"""
from __future__ import annotations

import random
from collections.abc import Container, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from ingress.router import ProxyState

V = TypeVar("V")

# How many draws the sampler makes per wanted candidate before it gives up on a pool (stale or
# excluded proxies are skipped, so a pool of mostly stale proxies must not make it loop).
TRIES_PER_PICK = 4
# Replica states that count as running for capacity.max (what the dispatcher's _may_start counts).
RUNNING_STATES = ("running", "starting")
# A version held by more proxies than this has this many of them drawn for each decision, not all: a
# popular version scaled out to hundreds of replicas (capacity.max goes to 1000) would otherwise have
# every request rank hundreds of hosts. Warm holders are drawn first, at random (power of d choices among
# equals, as Ray Serve's router draws two replicas), with one place kept for another holder (paused,
# stopped, starting) so that a lukewarm one stays in the running when every warm one drawn has a queue.
RANKED_HOLDERS = 3
# A version map is split over this many dicts by the key's hash. A dict grows (or sheds its deleted
# slots) by rebuilding itself whole in one step: the holders map's rebuild at 44 000 versions held the
# loop 1.0-1.6 ms inside one heartbeat's apply (5000 proxies); a shard's is 1/64 of that.
VERSION_SHARDS = 64


class _Pool:
    """A set of proxy ids with O(1) add and discard, and its ``items`` a list to draw from by index (a list
    plus positions)."""

    __slots__ = ("items", "pos")

    def __init__(self) -> None:
        self.items: list[str] = []
        self.pos: dict[str, int] = {}

    def add(self, pid: str) -> None:
        if pid not in self.pos:
            self.pos[pid] = len(self.items)
            self.items.append(pid)

    def discard(self, pid: str) -> None:
        i = self.pos.pop(pid, None)
        if i is None:
            return
        last = self.items.pop()
        if i < len(self.items):
            self.items[i] = last
            self.pos[last] = i

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, pid: object) -> bool:
        return pid in self.pos


class _VersionMap(Generic[V]):
    """version key → V, over ``VERSION_SHARDS`` plain dicts: none ever rebuilds more than a shard's share."""

    __slots__ = ("_shards",)

    def __init__(self) -> None:
        self._shards: list[dict[str, V]] = [{} for _ in range(VERSION_SHARDS)]

    def shard(self, version: str) -> dict[str, V]:
        """The dict that holds ``version``'s entry (a str's hash is cached: one lookup more than a dict)."""
        return self._shards[hash(version) % VERSION_SHARDS]

    def get(self, version: str, default: Any = None) -> Any:
        return self._shards[hash(version) % VERSION_SHARDS].get(version, default)

    def __getitem__(self, version: str) -> V:
        return self._shards[hash(version) % VERSION_SHARDS][version]

    def __setitem__(self, version: str, value: V) -> None:
        self._shards[hash(version) % VERSION_SHARDS][version] = value

    def __delitem__(self, version: str) -> None:
        del self._shards[hash(version) % VERSION_SHARDS][version]

    def __contains__(self, version: object) -> bool:
        return version in self._shards[hash(version) % VERSION_SHARDS]

    def __len__(self) -> int:
        return sum(map(len, self._shards))

    def __iter__(self) -> Iterator[str]:
        for shard in self._shards:
            yield from shard

    def clear(self) -> None:
        for shard in self._shards:
            shard.clear()


def has_room(state: ProxyState) -> bool:
    return len(state.replicas) < state.max_replicas


def _held(state: ProxyState) -> Iterator[str]:
    """The versions a proxy offers more than a bare cold start for: a replica of it in any state, or
    requests waiting for one (a start under way before the heartbeat shows its replica)."""
    for replica in state.replicas:
        yield replica.version
    for version, waiting in state.waiting:
        if waiting:
            yield version


class _Tally:
    """What one heartbeat says per version, for the index: replicas of it held (any state, plus one for
    requests waiting), replicas running or starting, and whether one runs (a warm holder)."""

    __slots__ = ("held", "active", "warm")

    def __init__(self, state: ProxyState | None = None) -> None:
        self.held: dict[str, int] = {}
        self.active: dict[str, int] = {}
        self.warm: set[str] = set()
        if state is None:
            return
        held, active = self.held, self.active
        for version in _held(state):
            held[version] = held.get(version, 0) + 1
        for replica in state.replicas:
            if replica.state in RUNNING_STATES:
                active[replica.version] = active.get(replica.version, 0) + 1
                if replica.state == "running":
                    self.warm.add(replica.version)


_NOTHING = _Tally()


class FleetIndex(dict[str, ProxyState]):
    """proxy id → ProxyState, with the version and room indexes kept right by every write of the mapping.

    All writes go through ``__setitem__``/``__delitem__`` (``pop``, ``update``, ``clear``… are routed
    there), so code and tests that treat the view's ``proxies`` as a plain dict keep the index right.
    """

    def __init__(self, proxies: Mapping[str, ProxyState] | Iterable[tuple[str, ProxyState]] = ()) -> None:
        super().__init__()
        # version key → {proxy id: replicas of it there}; an inner dict, not a set: its order (insertion)
        # is the same in every run, so a seeded rng gives the same decision.
        self._holders: _VersionMap[dict[str, int]] = _VersionMap()
        # For the versions with more than RANKED_HOLDERS holders only (most versions have a few: a split of
        # every one would double the index's memory): version key → ({warm holder: None}, {other: None}).
        self._split: _VersionMap[tuple[dict[str, None], dict[str, None]]] = _VersionMap()
        # version key → replicas of it running or starting, fleet-wide; kept (at 0) while the version has
        # holders, as the version map's entries are: a key deleted and added back as a replica pauses and
        # resumes would fill this big map with deleted slots, and its rehash would hold the loop.
        self._running: _VersionMap[int] = _VersionMap()
        self._all = _Pool()
        self._room = _Pool()
        self.update(proxies)

    # ---- writes: O(replicas of the one proxy) ----------------------------------------------------

    def __setitem__(self, pid: str, state: ProxyState) -> None:
        old = super().get(pid)
        super().__setitem__(pid, state)
        if old is None:
            self._index(pid, state)
        else:
            self._reindex(pid, old, state)

    def __delitem__(self, pid: str) -> None:
        old = super().__getitem__(pid)
        super().__delitem__(pid)
        self._unindex(pid, old)

    _MISSING: Any = object()

    def pop(self, pid: str, default: Any = _MISSING) -> Any:  # type: ignore[override]
        if pid in self:
            state = super().__getitem__(pid)
            del self[pid]
            return state
        if default is FleetIndex._MISSING:
            raise KeyError(pid)
        return default

    def popitem(self) -> tuple[str, ProxyState]:
        pid = next(reversed(self.keys()))
        return pid, self.pop(pid)

    def setdefault(self, pid: str, default: ProxyState) -> ProxyState:  # type: ignore[override]
        if pid not in self:
            self[pid] = default
        return super().__getitem__(pid)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for pid, state in dict(*args, **kwargs).items():
            self[pid] = state

    def clear(self) -> None:
        super().clear()
        self._holders.clear()
        self._split.clear()
        self._running.clear()
        self._all = _Pool()
        self._room = _Pool()

    def __ior__(self, other: Any) -> FleetIndex:  # type: ignore[override,misc]
        self.update(other)
        return self

    def copy(self) -> dict[str, ProxyState]:  # type: ignore[override]
        return dict(self)

    def _index(self, pid: str, state: ProxyState) -> None:
        self._move(pid, _NOTHING, _Tally(state))
        self._all.add(pid)
        self._room_of(pid, state)

    def _reindex(self, pid: str, old: ProxyState, state: ProxyState) -> None:
        """A proxy's next heartbeat: only the versions whose count there changed are touched. Removing and
        adding back every version at each beat would leave the version map (one key per version held in
        the fleet: 80 000 at 5000 proxies) full of deleted slots, and its rehash every few thousand
        beats held the loop 2-3 ms."""
        if old.replicas is not state.replicas or old.waiting != state.waiting:
            self._move(pid, _Tally(old), _Tally(state))
        self._room_of(pid, state)

    def _unindex(self, pid: str, state: ProxyState) -> None:
        self._move(pid, _Tally(state), _NOTHING)
        self._all.discard(pid)
        self._room.discard(pid)

    def _move(self, pid: str, before: _Tally, after: _Tally) -> None:
        """``pid``'s entries in the version maps go from what ``before`` says to what ``after`` says."""
        for version in before.active.keys() | after.active.keys():
            delta = after.active.get(version, 0) - before.active.get(version, 0)
            if delta:
                running = self._running.shard(version)
                running[version] = running.get(version, 0) + delta
        holders = self._holders
        moved = before.warm ^ after.warm
        for version in before.held:
            if version not in after.held:
                if _leave(holders.shard(version), version, pid):
                    self._running.shard(version).pop(version, None)
                moved.add(version)
        for version, n in after.held.items():
            was = before.held.get(version)
            if was != n:
                holders.shard(version).setdefault(version, {})[pid] = n
                if was is None:
                    moved.add(version)
        for version in moved:
            self._resplit(version, pid, version in after.held, version in after.warm)

    def _resplit(self, version: str, pid: str, held: bool, warm: bool) -> None:
        """``pid`` joined or left ``version``'s holders, or became warm or not: its warm/other split follows
        (made, from every holder's state, when the version passes ``RANKED_HOLDERS`` holders; dropped when
        it is back within)."""
        split = self._split.get(version)
        if len(self._holders.get(version, ())) <= RANKED_HOLDERS:
            if split is not None:
                del self._split[version]
            return
        if split is None:
            get = super().__getitem__
            split = self._split[version] = ({}, {})
            for holder in self._holders[version]:
                running = any(r.state == "running" for r in get(holder).by_version.get(version, ()))
                split[0 if running else 1][holder] = None
            return
        split[0].pop(pid, None)
        split[1].pop(pid, None)
        if held:
            split[0 if warm else 1][pid] = None

    def _room_of(self, pid: str, state: ProxyState) -> None:
        if has_room(state):
            self._room.add(pid)
        else:
            self._room.discard(pid)

    # ---- reads: O(holders + d) -------------------------------------------------------------------

    def holders(self, version: str) -> list[ProxyState]:
        """Every proxy with a replica of ``version`` (any state) or requests waiting for one, live or not:
        the caller judges age."""
        held = self._holders.get(version)
        return [super(FleetIndex, self).__getitem__(pid) for pid in held] if held else []

    def holder_ids(self, version: str) -> Iterator[str]:
        return iter(self._holders.get(version, ()))

    def versions(self) -> int:
        """How many versions have a replica somewhere."""
        return len(self._holders)

    def with_room(self) -> int:
        return len(self._room)

    def running_of(self, version: str) -> int:
        """Replicas of ``version`` running or starting across the fleet (kept by every write: O(1))."""
        return self._running.get(version, 0)

    def sample(self, rng: random.Random, d: int, now: float, max_age_s: float,
               skip: Container[str] = frozenset()) -> list[ProxyState]:
        """Up to ``d`` distinct live proxies (heartbeat at most ``max_age_s`` old as of ``now``) not in
        ``skip``, drawn uniformly from those with room; from the full ones only when none with room
        was found (a cold start there evicts, as the router's cost for a full host says).

        At most ``TRIES_PER_PICK × d`` draws per pool: O(d), never a scan. May return fewer than ``d``
        when most of a pool is stale or skipped.
        """
        if d <= 0:
            return []
        taken: dict[str, ProxyState] = {}
        self._draw(self._room.items, rng, d, now, max_age_s, skip, taken)
        if not taken:
            self._draw(self._all.items, rng, d, now, max_age_s, skip, taken)
        return list(taken.values())

    def _draw(self, pool: list[str] | dict[str, Any], rng: random.Random, d: int, now: float, max_age_s: float,
              skip: Container[str], taken: dict[str, ProxyState]) -> None:
        """``taken`` filled up to ``d`` with live proxies of ``pool`` not in ``skip`` (drawn at random, at most
        ``TRIES_PER_PICK × d`` draws; all of ``pool`` in order when it has no more than ``d``)."""
        n = len(pool)
        small = n <= d  # a small pool: all of it, in its order
        ids = pool if isinstance(pool, list) else list(pool)  # nothing writes the pool while it is drawn from
        get, rand = dict.__getitem__, rng.random
        for i in range(n if small else TRIES_PER_PICK * d):
            pid = ids[i] if small else ids[int(rand() * n)]
            if pid in taken or pid in skip:
                continue
            state = get(self, pid)
            if now - state.ts <= max_age_s:
                taken[pid] = state
                if len(taken) >= d:
                    return

    def candidates(self, version: str, rng: random.Random, d: int, now: float, max_age_s: float,
                   exclude: Container[str] = frozenset(), cold_if_busy: bool = False) -> list[ProxyState]:
        """The holders of ``version`` not in ``exclude`` (live or not: the router judges age, as it always
        did; past ``RANKED_HOLDERS`` of them, that many live ones drawn, warm first: ``_some_holders``), then
        up to ``d`` sampled live proxies with room that hold none of it.

        ``cold_if_busy``: the sampled ones only when no live holder has a warm slot free. For a request
        that runs as one chunk, the router puts such a holder first (its expected wait is 0) and a cold
        host would never be read; a popular version's decisions then rank its holders alone, as Ray
        Serve's multiplexed routing prefers the replicas holding the model.

        Never empty while a live proxy outside ``exclude`` exists: when sampling finds none (most of the
        fleet stale or excluded) it falls back to a scan of the fleet, the only O(fleet) path, taken
        only when nothing could be routed to otherwise.
        """
        held = self._holders.get(version)
        get = super().__getitem__
        if not held:
            out = []
        elif len(held) <= RANKED_HOLDERS:
            out = [get(pid) for pid in held if pid not in exclude]
        else:
            out = self._some_holders(version, held, rng, now, max_age_s, exclude)
        if cold_if_busy and out and _a_slot_free(out, version, now, max_age_s):
            return out
        skip: Container[str] = exclude if not held else _Either(held, exclude) if exclude else held
        sampled = self.sample(rng, d, now, max_age_s, skip)
        if sampled:
            out.extend(sampled)
        elif not any(now - p.ts <= max_age_s for p in out):
            out.extend(p for pid, p in self.items()
                       if now - p.ts <= max_age_s and pid not in exclude and (not held or pid not in held))
        return out

    def _some_holders(self, version: str, held: dict[str, int], rng: random.Random, now: float,
                      max_age_s: float, exclude: Container[str]) -> list[ProxyState]:
        """``RANKED_HOLDERS`` live holders of ``version`` not in ``exclude``, drawn at random: warm ones
        first, leaving one place for another holder when the version has any.

        Draws are bounded, so when most holders are stale (a rack gone, its heartbeats not yet expired)
        they may find none: then the holders are looked at in turn, O(holders), until one live is found."""
        warm, cool = self._split.get(version, (None, None))
        taken: dict[str, ProxyState] = {}
        if warm:
            self._draw(warm, rng, RANKED_HOLDERS - bool(cool), now, max_age_s, exclude, taken)
            if not taken:
                self._first_live(warm, now, max_age_s, exclude, taken)
        if cool:
            self._draw(cool, rng, RANKED_HOLDERS, now, max_age_s, exclude, taken)
        if not taken:
            self._first_live(held, now, max_age_s, exclude, taken)
        return list(taken.values())

    def _first_live(self, ids: Iterable[str], now: float, max_age_s: float, skip: Container[str],
                    taken: dict[str, ProxyState]) -> None:
        get = super().__getitem__
        for pid in ids:
            if pid not in skip and now - get(pid).ts <= max_age_s:
                taken[pid] = get(pid)
                return


def _a_slot_free(holders: list[ProxyState], version: str, now: float, max_age_s: float) -> bool:
    """A live one of ``holders`` runs ``version`` with a slot free and nobody waiting for it."""
    for p in holders:
        if now - p.ts <= max_age_s:
            kind, units = p.offer(version)
            if kind == "warm" and not units:
                return True
    return False


def _leave(index: dict[str, dict[str, Any]], version: str, pid: str) -> bool:
    """``pid`` out of ``version``'s entry in a version map's shard; the entry goes with its last proxy (then True)."""
    entries = index.get(version)
    if entries is not None and pid in entries:
        del entries[pid]
        if not entries:
            del index[version]
            return True
    return False


class _Either:
    """``x in a or x in b`` without building the union."""

    __slots__ = ("a", "b")

    def __init__(self, a: Container[str], b: Container[str]) -> None:
        self.a, self.b = a, b

    def __contains__(self, item: object) -> bool:
        return item in self.a or item in self.b
