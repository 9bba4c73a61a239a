"""A replica's lifecycle: one explicit state machine, its allowed transitions in one table.

``…ING`` states are the moments an engine call is in flight: a replica there
takes no new work of its own kind (a pausing replica is not handed a request;
a resuming one is, since the request waits in the socket's buffer and is
answered the moment the process thaws).
"""
from __future__ import annotations

import enum


class State(enum.Enum):
    STARTING = "starting"   # created or stopped → started, waiting for the harness's /ready
    RUNNING = "running"     # warm: takes requests
    PAUSING = "pausing"     # idle, being frozen
    PAUSED = "paused"       # lukewarm: frozen, memory kept
    RESUMING = "resuming"   # being thawed; takes requests (they wait in the socket)
    STOPPING = "stopping"   # being stopped
    STOPPED = "stopped"     # lukewarm: exited, container and image kept
    DEAD = "dead"           # gone or going: never used again

    @property
    def reported(self) -> str:
        """The state as heartbeats and the idle policy see it: warm, lukewarm or starting."""
        return _REPORTED[self]

    @property
    def takes_requests(self) -> bool:
        return self in (State.RUNNING, State.RESUMING)

    @property
    def live(self) -> bool:
        """Holds memory on the host (counts against its budgets)."""
        return self in (State.STARTING, State.RUNNING, State.PAUSING, State.PAUSED, State.RESUMING)


_REPORTED = {
    State.STARTING: "starting", State.RUNNING: "running", State.PAUSING: "paused", State.PAUSED: "paused",
    State.RESUMING: "paused", State.STOPPING: "stopped", State.STOPPED: "stopped", State.DEAD: "dead",
}

TRANSITIONS: dict[State, frozenset[State]] = {
    State.STARTING: frozenset({State.RUNNING, State.DEAD}),
    State.RUNNING: frozenset({State.PAUSING, State.STOPPING, State.DEAD}),
    State.PAUSING: frozenset({State.PAUSED, State.RUNNING, State.DEAD}),  # running: the freeze was undone
    State.PAUSED: frozenset({State.RESUMING, State.STOPPING, State.DEAD}),
    State.RESUMING: frozenset({State.RUNNING, State.DEAD}),
    State.STOPPING: frozenset({State.STOPPED, State.DEAD}),
    State.STOPPED: frozenset({State.STARTING, State.DEAD}),
    State.DEAD: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A bug: code asked a replica for a move its lifecycle does not allow."""


def transition(current: State, target: State) -> State:
    """``target`` when the lifecycle allows ``current`` → ``target``; IllegalTransition otherwise.

    DEAD → DEAD is allowed: retiring twice (a crash noticed by two callers) is harmless.
    """
    if target is State.DEAD or target in TRANSITIONS[current]:
        return target
    raise IllegalTransition(f"a replica cannot go from {current.value} to {target.value}")


# Docker container states a restarted proxy takes over, as replica states. An exited container is a
# stopped replica (lukewarm): started again on demand, and retired if it fails to come up.
ADOPTABLE = {"running": State.RUNNING, "paused": State.PAUSED, "exited": State.STOPPED}
