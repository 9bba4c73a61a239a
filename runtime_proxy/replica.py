"""One replica, and the replicas of one version on this host with the requests waiting for them."""
from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from runtime_proxy import lifecycle, policy
from runtime_proxy.harness_client import HarnessClient
from runtime_proxy.keepwarm import IdleTracker
from runtime_proxy.lifecycle import State
from shared.errors import ApiError
from shared.messages import VersionSpec

# What starting one more replica here is taken to cost until this host has timed one of the version (ms).
DEFAULT_START_MS = 400.0
# A start is added once the queue it spares would last this many starts (the ingress autoscaler's
# cold_start_patience, at the proxy).
START_PATIENCE = 1.0
MEASURE_ALPHA = 0.2  # weight of the newest sample in the pool's moving averages


def start_pays(waiting: int, coming: int, serving: int, service_ms: float, start_ms: float,
               patience: float = START_PATIENCE, queued_ms: float = 0.0) -> bool:
    """Whether one more replica should start for the requests waiting here (pure).

    ``waiting``: requests waiting for a slot; ``coming``: slots on replicas already starting;
    ``serving``: slots on replicas that take requests now (running, or thawing); ``service_ms``: how long
    a request holds a slot (measured, or longer when one in flight has already run longer);
    ``start_ms``: what a start costs. Nothing serving nor coming: start at once (every request would wait
    for one anyway). Only replicas coming: wait for them (they are part-way through the start that
    another would begin). Else the requests beyond the coming slots, drained by the serving slots, would
    wait ``(waiting - coming) / serving * service_ms``: a start pays once that outlasts ``patience``
    starts. A queue of a few fast requests behind a busy replica waits for it, as in ``ingress.autoscale``.
    ``queued_ms``: how long requests have stood in a queue here without a break (since the last start):
    a queue that short requests keep refilling costs its waiters a start's time too, only spread out
    (a fast model under a steady load one replica cannot keep up with), so a start pays then as well.
    """
    beyond = waiting - coming
    if beyond <= 0:
        return False
    if serving <= 0:
        return coming <= 0
    return max(beyond / serving * service_ms, queued_ms) >= start_ms * patience


def queue_since(since: float | None, now: float, waiting: int, coming: int, serving: int) -> float | None:
    """When the queue ``start_pays`` times (``queued_ms``) began, as of ``now`` (pure; any clock unit):
    ``since`` while it stands, ``now`` when it just formed, None when there is none. Requests waiting
    only for replicas already starting, or with nothing serving, are not a queue for a serving replica."""
    if waiting <= coming or not serving:
        return None
    return now if since is None else since


def start_due_in_ms(waiting: int, coming: int, serving: int, infer_ms: float, start_ms: float,
                    oldest_ms: float, patience: float = START_PATIENCE, queued_ms: float = 0.0) -> float | None:
    """When (ms from now) ``start_pays`` turns true if nothing else changes: the request longest in flight
    has run ``oldest_ms`` so far, and every ms it runs on raises the service time by one; the queue has
    stood ``queued_ms``. None: never by itself (nobody beyond the coming slots, or nothing serving)."""
    beyond = waiting - coming
    if beyond <= 0 or serving <= 0:
        return None
    needed_ms = start_ms * patience * serving / beyond  # the service time at which the queue outlasts a start
    by_service = 0.0 if infer_ms >= needed_ms else max(0.0, needed_ms - oldest_ms)
    return min(by_service, max(0.0, start_ms * patience - queued_ms))


@dataclasses.dataclass(eq=False)
class Replica:
    """One container (or process) of one version on this host."""

    replica_id: str
    spec: VersionSpec
    handle: str
    run_dir: Path
    client: HarnessClient
    concurrency: int
    state: State = State.STARTING
    last_used: float = 0.0
    in_flight: int = 0
    batch_in_flight: int = 0  # of in_flight, batch work: on-demand work may preempt it when the host is full
    preempted: bool = False
    started_at: float = 0.0
    gpu_uuid: str | None = None
    resuming: asyncio.Task[None] | None = None  # an unpause in flight
    # How the replica came up, for the first request it serves ("cold" or "lukewarm", and phase times).
    start_kind: str = ""
    start_timings: dict[str, float] = dataclasses.field(default_factory=dict)

    def move(self, to: State) -> None:
        self.state = lifecycle.transition(self.state, to)

    @property
    def has_room(self) -> bool:
        return self.state.takes_requests and self.in_flight < self.concurrency

    def take_start(self) -> tuple[str, dict[str, float]]:
        """What the first request on a freshly started replica reports; "warm" for the rest."""
        kind, timings = self.start_kind or "warm", self.start_timings
        self.start_kind, self.start_timings = "", {}
        return kind, timings

    def view(self) -> policy.ReplicaView:
        return policy.ReplicaView(
            replica_id=self.replica_id, version_key=self.spec.key, state=self.state.reported,
            in_flight=self.in_flight, last_used=self.last_used,
            idle_timeout_s=self.spec.idle_timeout_s, keep_warm=self.spec.keep_warm,
            memory_mb=self.spec.memory_mb, keep=self.spec.capacity.min, auto=self.spec.idle_auto,
        )


class Pulse:
    """A signal any number of tasks wait on: each ``fire()`` wakes those waiting at that moment."""

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None  # made by the first waiter: a fire nobody waits for is free

    def fire(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait(self, timeout_s: float | None = None) -> None:
        """Until the next ``fire()``, or ``timeout_s`` if given (then it returns all the same)."""
        if self._event is None:
            self._event = asyncio.Event()
        event = self._event
        if timeout_s is None:
            await event.wait()
            return
        try:
            # asyncio.timeout, not wait_for: no task per wait (every waiter of a busy version re-waits on
            # each slot freed).
            async with asyncio.timeout(max(0.0, timeout_s)):
                await event.wait()
        except TimeoutError:
            pass


class VersionPool:
    """The replicas of one version here, and a signal for requests waiting on them.

    Every change a waiter could care about (a slot freed, a replica ready,
    paused, dead, a start failed) calls ``changed()``; waiters re-examine the
    pool then. ``waiting`` counts them, so starts keep pace with demand.
    """

    def __init__(self) -> None:
        self.replicas: list[Replica] = []
        self.waiting = 0
        self.waiting_on_demand = 0  # batch waiters let these go first
        self.failure: ApiError | None = None  # the last start's failure, for waiters
        # The version's idle periods here (~1 KB whatever the traffic): what "auto" idle timeouts plan from.
        self.idle = IdleTracker()
        # Measured here (moving averages; None until timed): how long a chunk holds a slot, and a cold start.
        self.infer_ms: float | None = None
        self.start_ms: float | None = None
        self._taken: list[float] = []  # when each chunk in flight took its slot, oldest first
        self.queued_since: float | None = None  # requests have waited here without a break since (start_pays)
        self._pulse = Pulse()

    def changed(self) -> None:
        self._pulse.fire()

    async def wait_change(self, timeout_s: float | None = None) -> None:
        """Until the next ``changed()``, or ``timeout_s`` (a time-based decision falls due) if given."""
        await self._pulse.wait(timeout_s)

    def took(self, now: float) -> None:
        """A chunk took a slot of this version's: what scale-out (``wants_start``) and the idle times
        ("auto" idle timeouts) are measured from."""
        self._taken.append(now)
        self.idle.started(now)

    def released(self, now: float) -> None:
        # Which chunk ended is not known: dropping the oldest keeps the oldest-in-flight estimate on the low side.
        if self._taken:
            self._taken.pop(0)
        self.idle.finished(now)

    def note_infer(self, ms: float) -> None:
        self.infer_ms = ms if self.infer_ms is None else self.infer_ms + MEASURE_ALPHA * (ms - self.infer_ms)

    def note_start(self, ms: float) -> None:
        self.start_ms = ms if self.start_ms is None else self.start_ms + MEASURE_ALPHA * (ms - self.start_ms)

    def serving(self) -> int:
        """Slots on replicas that take requests now (running, or thawing for the request that took it)."""
        return sum(r.concurrency for r in self.replicas if r.state.takes_requests)

    def wants_start(self, now: float) -> tuple[bool, float | None]:
        """(whether another replica should start for the waiters now — ``start_pays`` —, else in how many
        seconds that may change with nothing else happening). ``now`` on the manager's clock, in seconds."""
        infer_ms = self.infer_ms or 0.0
        start_ms = self.start_ms if self.start_ms is not None else DEFAULT_START_MS
        oldest_ms = (now - self._taken[0]) * 1000 if self._taken else 0.0
        serving = self.serving()
        self.queued_since = queue_since(self.queued_since, now, self.waiting, self.coming, serving)
        queued_ms = 0.0 if self.queued_since is None else (now - self.queued_since) * 1000
        if start_pays(self.waiting, self.coming, serving, max(infer_ms, oldest_ms), start_ms, queued_ms=queued_ms):
            self.queued_since = now  # the next start must be earned by a queue of its own
            return True, None
        due = start_due_in_ms(self.waiting, self.coming, serving, infer_ms, start_ms, oldest_ms,
                              queued_ms=queued_ms) if self._taken else None
        return False, None if due is None else due / 1000 + 0.001

    def queue_gone(self) -> None:
        """Nobody waits here any more: a queue that forms again starts its clock afresh."""
        if not self.waiting:
            self.queued_since = None

    def pick(self) -> Replica | None:
        """The replica with room and the fewest requests in flight (ties: most recently used, it is warmest)."""
        ready = [r for r in self.replicas if r.has_room]
        return min(ready, key=lambda r: (r.in_flight / r.concurrency, -r.last_used)) if ready else None

    def having(self, *states: State) -> list[Replica]:
        return [r for r in self.replicas if r.state in states]

    @property
    def coming(self) -> int:
        """Request slots on replicas still starting, or being paused (the pause completes in milliseconds and
        the waiter thaws it then): what the waiting requests may expect soon, so that none starts another."""
        return sum(r.concurrency for r in self.replicas if r.state in (State.STARTING, State.PAUSING))
