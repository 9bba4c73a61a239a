"""Calls that meet a replica while it is being paused, or while one is being evicted, through the real
replica manager and real harness processes; the runtime's pause or removal is held open (or refused) by
the test to make the race certain.

A call that comes while the freeze is in flight waits for it and thaws the replica (a lukewarm start):
it must not start a second replica. A freeze the kernel does not complete (a task stuck in
uninterruptible sleep) is undone and the replica serves on: it must not be removed.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from runtime_proxy.daemon import install_harness
from runtime_proxy.lifecycle import State
from runtime_proxy.process_runtime import ProcessRuntime
from runtime_proxy.replicas import ReplicaManager
from runtime_proxy.runtime import RuntimeFailure
from shared.messages import ChunkRequest, VersionSpec
from shared.settings import ProxySettings
from tests.support.stack import MODELS_DIR, wait_until

pytestmark = pytest.mark.timeout(60)
SPEC = VersionSpec("acme", "echo", "main", 1, f"dir:{MODELS_DIR}", entrypoint="models:echo", idle_timeout_s=0.01)


class HeldPause(ProcessRuntime):
    """A pause that takes as long as the test says, or is refused the way an unfinished freeze is."""

    def __init__(self, refuse: bool = False) -> None:
        super().__init__()
        self.refuse = refuse
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def pause(self, handle: str) -> None:
        self.entered.set()
        await self.release.wait()
        if self.refuse:
            raise RuntimeFailure("pause_refused", "could not pause: the cgroup stayed freezing for 2.0 s")
        await super().pause(handle)


class HeldRemove(ProcessRuntime):
    """A container's removal that takes until the test lets it go (once ``hold`` is set)."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = False
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def remove(self, handle: str) -> None:
        if self.hold:
            self.entered.set()
            await self.release.wait()
        await super().remove(handle)


@contextlib.asynccontextmanager
async def manager_on(runtime: ProcessRuntime, state_dir: Path, **settings_: Any) -> AsyncIterator[ReplicaManager]:
    settings = ProxySettings(proxy_id="race-test", state_dir=str(state_dir), proxy_secret="s", **settings_)
    manager = ReplicaManager(runtime, settings, install_harness(state_dir))
    try:
        yield manager
    finally:
        await manager.close(stop_replicas=True)
        await runtime.close()


def chunk(data: str, spec: VersionSpec = SPEC) -> ChunkRequest:
    return ChunkRequest(spec=spec, inputs=[data], timeout_s=20, request_id="race")


async def test_a_call_during_a_pause_waits_for_it_and_thaws_the_replica(state_dir: Path) -> None:
    runtime = HeldPause()
    async with manager_on(runtime, state_dir) as manager:
        assert (await manager.run_chunk(chunk("a"))).outputs == [{"echo": "a"}]
        [replica] = manager.replicas.values()
        await wait_until(lambda: manager.clock() - replica.last_used > SPEC.idle_timeout_s, 5, "the replica idle")
        reaping = asyncio.create_task(manager.reap_once())
        await asyncio.wait_for(runtime.entered.wait(), 5)
        assert replica.state is State.PAUSING

        call = asyncio.create_task(manager.run_chunk(chunk("b")))
        # Once it waits on the pool it has made its choice: a second replica would be registered by now.
        await wait_until(lambda: manager._pool(SPEC.key).waiting == 1, 5, "the call to wait on the version")
        assert not call.done() and len(manager.replicas) == 1, "no second replica for a pause in flight"
        runtime.release.set()
        result = await asyncio.wait_for(call, 10)
        assert result.outputs == [{"echo": "b"}] and result.start == "lukewarm"
        assert list(manager.replicas.values()) == [replica] and replica.state is State.RUNNING
        await asyncio.wait_for(reaping, 10)


async def test_a_refused_freeze_leaves_the_replica_serving(state_dir: Path) -> None:
    runtime = HeldPause(refuse=True)
    runtime.release.set()
    async with manager_on(runtime, state_dir) as manager:
        assert (await manager.run_chunk(chunk("a"))).outputs == [{"echo": "a"}]
        [replica] = manager.replicas.values()
        await wait_until(lambda: manager.clock() - replica.last_used > SPEC.idle_timeout_s, 5, "the replica idle")
        done = await manager.reap_once()
        assert done["paused"] == [] and replica.state is State.RUNNING
        result = await manager.run_chunk(chunk("b"))
        assert result.outputs == [{"echo": "b"}] and result.start == "warm"
        assert list(manager.replicas.values()) == [replica], "kept, not removed"


async def test_a_start_keeps_the_room_it_evicted_for_while_the_victim_is_removed(state_dir: Path) -> None:
    """One replica fits. A start of ``again`` evicts the idle ``echo`` replica; while that container is
    being removed a call for ``echo`` comes. It must find the room taken (and wait for it), not take the
    room ``again`` made and leave ``again`` refused: that race let one model starve another."""
    again = dataclasses.replace(SPEC, model="again")
    runtime = HeldRemove()
    async with manager_on(runtime, state_dir, max_replicas=1) as manager:
        assert (await manager.run_chunk(chunk("a"))).outputs == [{"echo": "a"}]
        runtime.hold = True
        evicting = asyncio.create_task(manager.run_chunk(chunk("b", again)))
        await asyncio.wait_for(runtime.entered.wait(), 5)  # echo's replica evicted, its removal held
        runtime.hold = False
        comeback = asyncio.create_task(manager.run_chunk(chunk("c")))
        await wait_until(lambda: manager._pool(SPEC.key).waiting == 1, 5, "the echo call to wait")
        assert not any(r.spec.key == SPEC.key for r in manager.replicas.values()), "no echo start took the room"
        runtime.release.set()
        first = await asyncio.wait_for(evicting, 20)
        assert first.outputs == [{"echo": "b"}] and first.start == "cold"
        second = await asyncio.wait_for(comeback, 20)  # room freed when again's call ended: in turn
        assert second.outputs == [{"echo": "c"}] and second.start == "cold"
