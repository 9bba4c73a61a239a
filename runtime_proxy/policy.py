"""Pure lifecycle decisions of a proxy: what to pause, stop, remove or evict.

Each function takes a snapshot of plain data and ``now`` and returns the
replica ids to act on; the replica manager applies them. No I/O here.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping, Sequence

from runtime_proxy.keepwarm import Plan, fixed_plan


@dataclasses.dataclass(frozen=True)
class ReplicaView:
    """What the policy needs to know of one replica."""

    replica_id: str
    version_key: str
    state: str  # starting | running | paused | stopped
    in_flight: int
    last_used: float
    idle_timeout_s: float
    keep_warm: bool
    memory_mb: int
    keep: int = 0  # the version's capacity.min: replicas of it kept on disk (stopped) rather than removed
    auto: bool = False  # idle_timeout_s "auto": keepwarm_steps decides, the fixed rules below skip it


def replicas_to_pause(replicas: Sequence[ReplicaView], now: float) -> list[str]:
    """Running replicas idle for their version's idle timeout, unless kept warm."""
    return [
        r.replica_id for r in replicas
        if r.state == "running" and r.in_flight == 0 and not r.keep_warm and not r.auto
        and now - r.last_used >= r.idle_timeout_s
    ]


def replicas_to_stop(replicas: Sequence[ReplicaView], now: float, stop_after_s: float) -> list[str]:
    """Paused replicas idle much longer than their timeout: stopped to free memory."""
    return [
        r.replica_id for r in replicas
        if r.state == "paused" and r.in_flight == 0 and not r.auto
        and now - r.last_used >= r.idle_timeout_s + stop_after_s
    ]


def replicas_to_remove(replicas: Sequence[ReplicaView], now: float, stop_after_s: float,
                       remove_after_s: float) -> list[str]:
    """Stopped replicas idle past ``remove_after_s`` more: removed, down to their version's ``keep``.

    The most recently used of each version are the ones kept (a stopped replica costs only disk;
    ``capacity.min`` counts it as ready, and starting it again is cheaper than a cold start).
    """
    return _removable(replicas, lambda r: not r.auto and now - r.last_used >= r.idle_timeout_s + stop_after_s
                      + remove_after_s)


def _removable(replicas: Sequence[ReplicaView], due: Callable[[ReplicaView], bool]) -> list[str]:
    """Stopped replicas that are ``due``, except the most recently used of each version up to its ``keep``."""
    by_version: dict[str, list[ReplicaView]] = {}
    for r in replicas:
        by_version.setdefault(r.version_key, []).append(r)
    out = []
    for mine in by_version.values():
        stopped = sorted((r for r in mine if r.state == "stopped" and r.in_flight == 0), key=lambda r: -r.last_used)
        keep = max(0, mine[0].keep - sum(1 for r in mine if r.state != "stopped"))
        out += [r.replica_id for r in stopped[keep:] if due(r)]
    return out


def keepwarm_steps(replicas: Sequence[ReplicaView], plans: Mapping[str, Plan], now: float,
                   remove_after_s: float) -> list[tuple[str, str]]:
    """``(step, replica_id)`` for the idle replicas of ``auto`` versions: ``pause``, ``stop``, ``prewarm``
    (start a stopped one: it waits paused for the call its version's idle times predict) or ``remove``.

    ``plans`` holds each version's plan for its current idle period (``runtime_proxy.keepwarm``); a version
    without one (busy: another of its replicas has a call in flight) has its idle replicas judged by the
    fallback alone, from their own last use. A stopped replica is removed ``remove_after_s`` after its plan
    no longer wants memory, down to the version's ``keep``, as the fixed rules do.
    """
    def plan_of(r: ReplicaView) -> Plan:
        return plans.get(r.version_key) or fixed_plan(r.last_used, r.idle_timeout_s)

    mine = [r for r in replicas if r.auto and not r.keep_warm]
    steps: list[tuple[str, str]] = []
    for r in mine:
        if r.in_flight == 0 and r.state in ("running", "paused", "stopped"):
            step = plan_of(r).action(r.state, now)
            if step is not None:
                steps.append((step, r.replica_id))
    prewarming = {rid for step, rid in steps if step == "prewarm"}
    gone = _removable(mine, lambda r: r.replica_id not in prewarming and now >= plan_of(r).release_at + remove_after_s)
    return steps + [("remove", rid) for rid in gone]


def replicas_to_evict(
    replicas: Sequence[ReplicaView], memory_budget_mb: int, max_replicas: int, incoming_mb: int = 0,
    evict_running: bool = False, incoming: int | None = None,
) -> list[str]:
    """Least recently used idle replicas to remove so the host fits its budgets.

    Stopped replicas go first, then paused ones, each oldest first. Busy replicas
    are never evicted. Idle running ones only with ``evict_running`` (a start that
    needs room: otherwise ``keep_warm`` or a long idle timeout would let one
    customer hold every slot of the host for good). ``incoming_mb`` makes room
    for a replica about to start; ``incoming`` counts the replicas about to start (default: one when
    ``incoming_mb`` is given), those whose room was made but that are not created yet among them.
    """
    live = [r for r in replicas if r.state in {"starting", "running", "paused"}]
    used_mb = sum(r.memory_mb for r in live) + incoming_mb
    count = len(replicas) + (incoming if incoming is not None else (1 if incoming_mb else 0))
    order = {"stopped": 0, "paused": 1, **({"running": 2} if evict_running else {})}
    candidates = sorted(
        (r for r in replicas if r.state in order and r.in_flight == 0),
        key=lambda r: (order[r.state], r.last_used),
    )
    evict: list[str] = []
    for r in candidates:
        over_memory = memory_budget_mb > 0 and used_mb > memory_budget_mb
        if not over_memory and count <= max_replicas:
            break
        if r.state == "stopped" and not (count > max_replicas):
            continue  # a stopped replica holds no memory; only the count matters for it
        evict.append(r.replica_id)
        count -= 1
        if r.state != "stopped":
            used_mb -= r.memory_mb
    return evict


def fits(live: int, live_mb: int, incoming_mb: int, max_replicas: int, memory_budget_mb: int) -> bool:
    """Whether one more replica of ``incoming_mb`` fits a host holding ``live`` replicas of ``live_mb`` in all
    (starts whose room is made counted among them) within its replica count and memory budget."""
    return live < max_replicas and live_mb + incoming_mb <= memory_budget_mb


def quota_evictions(replicas: Sequence[ReplicaView], customer: str, quota: int, starting: int = 0) -> list[str] | None:
    """Replicas of ``customer`` to remove so one more of theirs fits its per-host ``quota`` of live replicas,
    ``starting`` more of theirs being on their way (room made, not yet among ``replicas``).

    Their own idle replicas go, paused before running, least recently used first;
    None when their replicas here are all busy (the start must wait or go elsewhere).
    """
    prefix = customer + "/"
    mine = [r for r in replicas if r.version_key.startswith(prefix) and r.state in {"starting", "running", "paused"}]
    excess = len(mine) + starting + 1 - quota
    if excess <= 0:
        return []
    rank = {"paused": 0, "running": 1}
    idle = sorted((r for r in mine if r.state in rank and r.in_flight == 0), key=lambda r: (rank[r.state], r.last_used))
    if len(idle) < excess:
        return None
    return [r.replica_id for r in idle[:excess]]


def backoff_s(failures: int, base_s: float, cap_s: float = 300.0) -> float:
    """Delay before the next start of a version whose replicas keep failing."""
    if failures <= 0:
        return 0.0
    return min(cap_s, base_s * 2 ** (failures - 1))


def images_to_prune(
    last_used: dict[str, float], in_use: set[str], now: float, idle_s: float, max_images: int,
    pullable: Collection[str] | None = None,
) -> list[str]:
    """Images no replica here uses, least recently used first: every one idle past ``idle_s``,
    and more while the host keeps over ``max_images`` images.

    Only images in ``pullable`` (None: every one) are ever pruned: one no registry could hand back
    (built on this host only) would be gone for good, so it is kept whatever its age; it still counts
    toward ``max_images``, so pullable ones go in its place.
    """
    idle = sorted((t, image) for image, t in last_used.items()
                  if image not in in_use and (pullable is None or image in pullable))
    excess = len(last_used) - max_images
    prune = []
    for i, (t, image) in enumerate(idle):
        if now - t >= idle_s or i < excess:
            prune.append(image)
    return prune
