"""The proxy's chunk ledger: copies of a chunk join its run or get its answer; bounded; cancel before the model."""
from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from loadtests.common import wait_until
from runtime_proxy.ledger import ChunkLedger
from tests.support.clock import ManualClock

pytestmark = pytest.mark.timeout(10)
WAIT_S = 5.0


class Work:
    """A chunk run: waits for ``release``; ``model`` is set once it 'reached the model' (on_start called)."""

    def __init__(self, answer: bytes = b'{"outputs":[1]}', start_at_once: bool = True) -> None:
        self.answer = answer
        self.release = asyncio.Event()
        self.runs = 0
        self.start_at_once = start_at_once
        self.queued = asyncio.Event()
        self.cancelled = False

    async def __call__(self, on_start: Callable[[], None]) -> bytes:
        self.runs += 1
        self.queued.set()
        if self.start_at_once:
            on_start()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return self.answer


async def test_a_copy_in_flight_joins_the_run_and_a_later_one_gets_its_answer() -> None:
    ledger, work = ChunkLedger(60.0, 2**20), Work()
    first = asyncio.ensure_future(ledger.run("v@1/r:0", work))
    second = asyncio.ensure_future(ledger.run("v@1/r:0", work))
    await asyncio.wait_for(work.queued.wait(), WAIT_S)
    work.release.set()
    assert await asyncio.wait_for(first, WAIT_S) == (work.answer, False)
    assert await asyncio.wait_for(second, WAIT_S) == (work.answer, True)
    assert await ledger.run("v@1/r:0", work) == (work.answer, True)
    assert work.runs == 1 and (ledger.joined, ledger.replayed) == (1, 1)


async def test_an_empty_id_or_a_zero_window_never_deduplicates() -> None:
    for ledger, cid in ((ChunkLedger(60.0, 2**20), ""), (ChunkLedger(0.0, 2**20), "v@1/r:0")):
        work = Work()
        work.release.set()
        await ledger.run(cid, work)
        await ledger.run(cid, work)
        assert work.runs == 2


async def test_answers_are_forgotten_after_the_window() -> None:
    clock = ManualClock(0.0)
    ledger, work = ChunkLedger(10.0, 2**20, clock), Work()
    work.release.set()
    await ledger.run("a", work)
    clock.now = 9.9
    assert (await ledger.run("a", work))[1] is True
    clock.now = 10.1
    assert (await ledger.run("a", work))[1] is False and work.runs == 2


async def test_stored_answers_stay_within_the_byte_bound_oldest_forgotten_first() -> None:
    ledger = ChunkLedger(60.0, 1000)
    for i in range(10):
        work = Work(answer=b"x" * 200)
        work.release.set()
        await ledger.run(f"c{i}", work)
    assert ledger.stored_bytes <= 1000
    again = Work(answer=b"y")
    again.release.set()
    assert await ledger.run("c9", again) == (b"x" * 200, True)  # the newest is kept
    assert await ledger.run("c0", again) == (b"y", False) and again.runs == 1  # the oldest went


async def test_an_answer_larger_than_a_quarter_of_the_bound_is_not_kept() -> None:
    ledger, work = ChunkLedger(60.0, 1000), Work(answer=b"x" * 300)
    work.release.set()
    await ledger.run("big", work)
    assert ledger.stored_bytes == 0
    await ledger.run("big", work)
    assert work.runs == 2


async def test_a_failed_run_is_not_kept_a_copy_runs_again() -> None:
    ledger = ChunkLedger(60.0, 2**20)
    runs = 0

    async def failing(on_start: Callable[[], None]) -> bytes:
        nonlocal runs
        runs += 1
        raise RuntimeError("replica died")

    for _ in range(2):
        with pytest.raises(RuntimeError):
            await ledger.run("c", failing)
    assert runs == 2 and ledger.in_flight() == 0


async def test_a_run_nobody_waits_for_is_cancelled_while_it_waits_for_a_replica() -> None:
    ledger, work = ChunkLedger(60.0, 2**20), Work(start_at_once=False)
    caller = asyncio.ensure_future(ledger.run("c", work))
    await asyncio.wait_for(work.queued.wait(), WAIT_S)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await wait_until(lambda: work.cancelled and ledger.in_flight() == 0, WAIT_S, "the queued run to be dropped")


async def test_once_the_model_has_it_a_run_finishes_for_a_copy_that_may_come() -> None:
    ledger, work = ChunkLedger(60.0, 2**20), Work(start_at_once=True)
    caller = asyncio.ensure_future(ledger.run("c", work))
    await asyncio.wait_for(work.queued.wait(), WAIT_S)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert not work.cancelled and ledger.in_flight() == 1
    work.release.set()
    await asyncio.wait_for(ledger.close(), WAIT_S)
    assert await ledger.run("c", work) == (work.answer, True) and work.runs == 1


async def test_one_copy_going_away_does_not_cancel_the_run_another_waits_for() -> None:
    ledger, work = ChunkLedger(60.0, 2**20), Work(start_at_once=False)
    a = asyncio.ensure_future(ledger.run("c", work))
    b = asyncio.ensure_future(ledger.run("c", work))
    await asyncio.wait_for(work.queued.wait(), WAIT_S)
    a.cancel()
    await asyncio.gather(a, return_exceptions=True)
    assert not work.cancelled
    work.release.set()
    assert await asyncio.wait_for(b, WAIT_S) == (work.answer, True)
