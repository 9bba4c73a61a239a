"""The fleet, indexed for routing: who holds each version, who has room, kept up to date one heartbeat at a time.

``FleetIndex`` is the view's ``proxies`` mapping (proxy id → its last ``ProxyState``) and keeps, on every
write, what a routing decision needs so that it never scans the fleet:

- holders: version key → the proxies with a replica of it in any state, or requests waiting there for
  one (the warm, lukewarm and starting candidates);
- two pools with O(1) add, remove and uniform pick: every proxy, and the proxies with room (fewer
  replicas than their ``max_replicas``), from which cold candidates are sampled (power of d choices).

Guarantees: a write (a heartbeat applied, a proxy dropped or suspected) costs O(replicas of that proxy),
whatever the fleet; ``candidates`` costs O(holders + d) and returns every holder; ``running_of`` costs
O(holders). Reads are pure: the index changes only through the mapping's own writes.
"""
from __future__ import annotations

import random
from collections.abc import Container, Iterable, Iterator, Mapping
from typing import Any

from ingress.router import ProxyState

# How many draws the sampler makes per wanted candidate before it gives up on a pool (stale or
# excluded proxies are skipped, so a pool of mostly stale proxies must not make it loop).
TRIES_PER_PICK = 4
# Replica states that count as running for capacity.max (what the dispatcher's _may_start counts).
RUNNING_STATES = ("running", "starting")


class _Pool:
    """A set of proxy ids with O(1) add, discard and uniform pick (a list plus positions)."""

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

    def pick(self, rng: random.Random) -> str:
        return self.items[int(rng.random() * len(self.items))]


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


def _counts(state: ProxyState) -> dict[str, int]:
    out: dict[str, int] = {}
    for version in _held(state):
        out[version] = out.get(version, 0) + 1
    return out


class FleetIndex(dict[str, ProxyState]):
    """proxy id → ProxyState, with the version and room indexes kept right by every write of the mapping.

    All writes go through ``__setitem__``/``__delitem__`` (``pop``, ``update``, ``clear``… are routed
    there), so code and tests that treat the view's ``proxies`` as a plain dict keep the index right.
    """

    def __init__(self, proxies: Mapping[str, ProxyState] | Iterable[tuple[str, ProxyState]] = ()) -> None:
        super().__init__()
        # version key → {proxy id: replicas of it there}; an inner dict, not a set: its order (insertion)
        # is the same in every run, so a seeded rng gives the same decision.
        self._holders: dict[str, dict[str, int]] = {}
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
        self._all = _Pool()
        self._room = _Pool()

    def __ior__(self, other: Any) -> FleetIndex:  # type: ignore[override,misc]
        self.update(other)
        return self

    def copy(self) -> dict[str, ProxyState]:  # type: ignore[override]
        return dict(self)

    def _index(self, pid: str, state: ProxyState) -> None:
        self._move(pid, {}, _counts(state))
        self._all.add(pid)
        self._room_of(pid, state)

    def _reindex(self, pid: str, old: ProxyState, state: ProxyState) -> None:
        """A proxy's next heartbeat: only the versions whose count there changed are touched. Removing and
        adding back every version at each beat would leave the version map (one key per version held in
        the fleet: 80 000 at 5000 proxies) full of deleted slots, and its rehash every few thousand
        beats held the loop 2-3 ms."""
        if old.replicas is not state.replicas or old.waiting != state.waiting:
            self._move(pid, _counts(old), _counts(state))
        self._room_of(pid, state)

    def _unindex(self, pid: str, state: ProxyState) -> None:
        self._move(pid, _counts(state), {})
        self._all.discard(pid)
        self._room.discard(pid)

    def _move(self, pid: str, before: dict[str, int], after: dict[str, int]) -> None:
        """``pid``'s entries in the version map go from ``before`` to ``after`` (version → its count there)."""
        for version in before:
            if version not in after:
                held = self._holders.get(version)
                if held is not None and held.pop(pid, None) is not None and not held:
                    del self._holders[version]
        for version, n in after.items():
            if before.get(version) != n:
                self._holders.setdefault(version, {})[pid] = n

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

    def running_of(self, version: str, states: Container[str] = RUNNING_STATES) -> int:
        """Replicas of ``version`` in ``states`` (running or starting) across the fleet: O(holders)."""
        get = super().__getitem__
        return sum(1 for pid in self._holders.get(version, ()) for r in get(pid).by_version.get(version, ())
                   if r.state in states)

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
        out = self._draw(self._room, rng, d, now, max_age_s, skip, {})
        if not out:
            out = self._draw(self._all, rng, d, now, max_age_s, skip, {})
        return out

    def _draw(self, pool: _Pool, rng: random.Random, d: int, now: float, max_age_s: float,
              skip: Container[str], taken: dict[str, ProxyState]) -> list[ProxyState]:
        if not pool:
            return []
        get = super().__getitem__
        if len(pool) <= d:  # small pool: take all of it, in its order
            candidates: Iterable[str] = list(pool.items)
        else:
            candidates = (pool.pick(rng) for _ in range(TRIES_PER_PICK * d))
        for pid in candidates:
            if pid in taken or pid in skip:
                continue
            state = get(pid)
            if now - state.ts <= max_age_s:
                taken[pid] = state
                if len(taken) >= d:
                    break
        return list(taken.values())

    def candidates(self, version: str, rng: random.Random, d: int, now: float, max_age_s: float,
                   exclude: Container[str] = frozenset()) -> list[ProxyState]:
        """Every holder of ``version`` not in ``exclude`` (live or not: the router judges age, as it always
        did), then up to ``d`` sampled live proxies with room that hold none of it.

        Never empty while a live proxy outside ``exclude`` exists: when sampling finds none (most of the
        fleet stale or excluded) it falls back to a scan of the fleet, the only O(fleet) path, taken
        only when nothing could be routed to otherwise.
        """
        held = self._holders.get(version)
        get = super().__getitem__
        out = [get(pid) for pid in held if pid not in exclude] if held else []
        skip: Container[str] = exclude if not held else _Either(held, exclude)
        sampled = self.sample(rng, d, now, max_age_s, skip)
        if sampled:
            out.extend(sampled)
        elif not any(now - p.ts <= max_age_s for p in out):
            out.extend(p for pid, p in self.items()
                       if now - p.ts <= max_age_s and pid not in exclude and (not held or pid not in held))
        return out


class _Either:
    """``x in a or x in b`` without building the union."""

    __slots__ = ("a", "b")

    def __init__(self, a: Container[str], b: Container[str]) -> None:
        self.a, self.b = a, b

    def __contains__(self, item: object) -> bool:
        return item in self.a or item in self.b
