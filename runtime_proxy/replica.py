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
        self._pulse = asyncio.Event()

    def changed(self) -> None:
        self._pulse.set()
        self._pulse = asyncio.Event()

    async def wait_change(self) -> None:
        await self._pulse.wait()

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
