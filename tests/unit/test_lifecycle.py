"""The replica state machine, from its table: every allowed move, and every other one refused."""
from __future__ import annotations

import itertools

import pytest

from runtime_proxy.lifecycle import TRANSITIONS, IllegalTransition, State, transition

ALLOWED = {
    (State.STARTING, State.RUNNING), (State.RUNNING, State.PAUSING), (State.RUNNING, State.STOPPING),
    (State.PAUSING, State.PAUSED), (State.PAUSING, State.RUNNING),  # a freeze undone: it runs on
    (State.PAUSED, State.RESUMING), (State.PAUSED, State.STOPPING),
    (State.RESUMING, State.RUNNING), (State.STOPPING, State.STOPPED), (State.STOPPED, State.STARTING),
}


@pytest.mark.parametrize(("current", "target"), list(itertools.product(State, State)))
def test_every_move(current: State, target: State) -> None:
    if (current, target) in ALLOWED or target is State.DEAD:
        assert transition(current, target) is target
    else:
        with pytest.raises(IllegalTransition):
            transition(current, target)


def test_the_table_is_the_one_the_code_uses() -> None:
    assert {(a, b) for a, targets in TRANSITIONS.items() for b in targets if b is not State.DEAD} == ALLOWED


@pytest.mark.parametrize(
    ("state", "reported", "takes_requests", "live"),
    [
        (State.STARTING, "starting", False, True),
        (State.RUNNING, "running", True, True),
        (State.PAUSING, "paused", False, True),
        (State.PAUSED, "paused", False, True),
        (State.RESUMING, "paused", True, True),  # answered within ms, but not warm yet
        (State.STOPPING, "stopped", False, False),
        (State.STOPPED, "stopped", False, False),
        (State.DEAD, "dead", False, False),
    ],
)
def test_what_each_state_means(state: State, reported: str, takes_requests: bool, live: bool) -> None:
    assert (state.reported, state.takes_requests, state.live) == (reported, takes_requests, live)
