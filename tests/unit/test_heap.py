"""shared/heap.py: no automatic full collection while installed, the scheduled one frees old cycles,
young passes free young cycles and take the middle generation in their rhythm."""
from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from shared import heap
from shared.heap import HeapKeeper, young_pass


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


@pytest.fixture
def thresholds() -> Iterator[tuple[int, ...]]:
    before = gc.get_threshold()
    yield before
    gc.set_threshold(*before)
    assert heap._installs == 0


def test_install_turns_off_automatic_full_passes_and_uninstall_restores(thresholds: tuple[int, ...]) -> None:
    keeper = HeapKeeper()
    keeper.install()
    keeper.install()  # idempotent
    assert gc.get_threshold() == (thresholds[0], heap.YOUNG_PASSES_PER_MIDDLE, heap.NO_AUTOMATIC_FULL)
    keeper.uninstall()
    assert gc.get_threshold() == thresholds


def test_installs_nest_and_the_last_uninstall_restores(thresholds: tuple[int, ...]) -> None:
    a, b = HeapKeeper(), HeapKeeper()
    a.install()
    b.install()
    a.uninstall()  # not in the order they came
    assert gc.get_threshold()[2] == heap.NO_AUTOMATIC_FULL
    b.uninstall()
    assert gc.get_threshold() == thresholds


def test_an_old_cycle_waits_for_the_round_which_frees_it(thresholds: tuple[int, ...]) -> None:
    keeper = HeapKeeper()
    keeper.install()
    try:
        node = Node()
        gc.collect()  # it is old now
        dead = weakref.ref(node)
        del node
        garbage = []
        for _ in range(200_000):  # allocations: young passes, and without the keeper full ones too
            garbage.append([])
            if len(garbage) > 1000:
                garbage.clear()
        assert dead() is not None, "an automatic full pass ran"
        assert keeper.round() >= 1
        assert dead() is None
        assert keeper.rounds == 1 and keeper.freed >= 1 and keeper.last_full_ms > 0
    finally:
        keeper.uninstall()


def test_young_pass_frees_a_young_cycle_and_takes_the_middle_generation_in_rhythm(
        thresholds: tuple[int, ...]) -> None:
    gc.collect()
    node = Node()
    dead = weakref.ref(node)
    del node
    young_pass()
    assert dead() is None
    gc.collect()
    middle = gc.get_threshold()[1]
    for i in range(middle):
        young_pass()
        assert gc.get_count()[1] == i + 1  # young passes counted toward the middle generation's
    young_pass()  # the middle generation's turn: its count starts again
    assert gc.get_count()[1] == 0


def test_young_pass_does_nothing_while_the_collector_is_off() -> None:
    gc.disable()
    try:
        node = Node()
        dead = weakref.ref(node)
        del node
        young_pass()
        assert dead() is not None
    finally:
        gc.enable()
        gc.collect()
