"""Predictive keep-warm (``idle_timeout_s: "auto"``) on the real Docker engine: a version called like a
timer is stopped between calls and pre-warmed (started, then frozen) just before the next one is due.

The replica manager runs in-process on a clock the test moves (two minutes between calls would make a
slow test); the containers, their freezer and Docker's own view of them are real.
"""
from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from runtime_proxy import freezer
from runtime_proxy.daemon import install_harness
from runtime_proxy.docker_runtime import DockerRuntime
from runtime_proxy.lifecycle import State
from runtime_proxy.replica import Replica
from runtime_proxy.replicas import ReplicaManager
from shared.messages import AUTO_FALLBACK_IDLE_S, ChunkRequest, VersionSpec
from shared.settings import ProxySettings
from tests.integration.test_lifecycle import containers, effective_status
from tests.support.clock import ManualClock
from tests.support.stack import remove_containers, wait_until

pytestmark = [pytest.mark.timeout(180)]
PERIOD_S = 120.0


@contextlib.asynccontextmanager
async def manager_on(clock: ManualClock, state_dir: Path) -> AsyncIterator[ReplicaManager]:
    settings = ProxySettings(proxy_id=f"kw-{uuid.uuid4().hex[:8]}", state_dir=str(state_dir), proxy_secret="s")
    runtime = DockerRuntime()
    manager = ReplicaManager(runtime, settings, install_harness(state_dir), clock=clock)
    try:
        yield manager
    finally:
        await manager.close(stop_replicas=True)
        await runtime.close()
        remove_containers(f"lukewarm.proxy={settings.proxy_id}")


async def call(manager: ReplicaManager, spec: VersionSpec, data: Any) -> tuple[Any, str]:
    result = await manager.run_chunk(ChunkRequest(spec=spec, inputs=[data], timeout_s=60, request_id="kw"))
    assert result.outputs is not None, result.error
    return result.outputs[0], result.start


async def called_like_a_timer(manager: ReplicaManager, clock: ManualClock, spec: VersionSpec) -> tuple[float, Replica]:
    """A call every two minutes, twelve times: the histogram has seen enough to trust it. The last call's
    time, and the one replica that served them (running)."""
    for i in range(12):
        clock.now = 10_000.0 + i * PERIOD_S
        assert (await call(manager, spec, i))[0] == {"echo": i}
    [replica] = manager.replicas.values()
    assert replica.state is State.RUNNING
    return clock.now, replica


def docker_state(manager: ReplicaManager) -> str:
    [container] = containers(manager.settings.proxy_id)
    return effective_status(container)


async def test_a_timer_like_version_is_stopped_between_calls_and_prewarmed_before_the_next(
    state_dir: Path, model_image: str,
) -> None:
    clock = ManualClock(10_000.0)
    spec = VersionSpec("acme", "timer", "main", 1, model_image, entrypoint="models:echo",
                       idle_timeout_s=AUTO_FALLBACK_IDLE_S, idle_auto=True)
    async with manager_on(clock, state_dir) as manager:
        last, replica = await called_like_a_timer(manager, clock, spec)

        # Half way to the next call: no memory is worth holding, the replica is stopped (a fixed
        # 300 s idle timeout would still hold it running).
        clock.now = last + 40
        done = await manager.reap_once()
        assert done["stopped"] == [replica.replica_id] and replica.state is State.STOPPED
        assert docker_state(manager) == "exited"

        # Not yet: the pre-warm window is the histogram's bin holding these idle times (117.4-129.1 s),
        # started the 5 s start lead before it.
        clock.now = last + 110
        assert (await manager.reap_once())["prewarmed"] == [] and replica.state is State.STOPPED
        # Shortly before the call is due: started again in the background, then frozen to wait for it.
        clock.now = last + 114
        done = await manager.reap_once()
        assert done["prewarmed"] == [replica.replica_id]
        await wait_until(lambda: replica.state is State.RUNNING, 60, "the pre-warmed replica to be up", 0.05)
        clock.now = last + 115
        done = await manager.reap_once()
        assert done["paused"] == [replica.replica_id]
        assert docker_state(manager) == "paused"
        file = freezer.locate(replica.handle)
        assert file is not None and freezer.is_frozen(file)

        # The call finds it paused: a thaw, not a start.
        clock.now = last + PERIOD_S
        output, kind = await call(manager, spec, "due")
        assert output == {"echo": "due"} and kind == "lukewarm"
        assert docker_state(manager) == "running"


async def test_a_slow_starting_timer_is_prewarmed_as_far_ahead_as_its_starts_take(
    state_dir: Path, model_image: str,
) -> None:
    """The same timer, its starts measured at 20 s here (set on the pool, as a slow model's would be): the
    pre-warm comes 30 s before the window (117.4 s), not the default 5 s, so that it is up when called."""
    clock = ManualClock(10_000.0)
    spec = VersionSpec("acme", "slowtimer", "main", 1, model_image, entrypoint="models:echo",
                       idle_timeout_s=AUTO_FALLBACK_IDLE_S, idle_auto=True)
    async with manager_on(clock, state_dir) as manager:
        last, replica = await called_like_a_timer(manager, clock, spec)
        manager._pool(spec.key).start_ms = 20_000.0
        clock.now = last + 40
        assert (await manager.reap_once())["stopped"] == [replica.replica_id]
        clock.now = last + 85
        assert (await manager.reap_once())["prewarmed"] == [] and replica.state is State.STOPPED
        clock.now = last + 90
        assert (await manager.reap_once())["prewarmed"] == [replica.replica_id]
        await wait_until(lambda: replica.state is State.RUNNING, 60, "the pre-warmed replica to be up", 0.05)


async def test_an_auto_version_with_too_few_calls_keeps_the_fallback_timeout(
    state_dir: Path, model_image: str,
) -> None:
    clock = ManualClock(10_000.0)
    spec = VersionSpec("acme", "new", "main", 1, model_image, entrypoint="models:echo",
                       idle_timeout_s=60.0, idle_auto=True)
    async with manager_on(clock, state_dir) as manager:
        assert (await call(manager, spec, 1))[0] == {"echo": 1}
        [replica] = manager.replicas.values()
        clock.now += 29
        assert (await manager.reap_once())["paused"] == [] and replica.state is State.RUNNING
        clock.now += 2  # paused soon (a thaw costs ~1 ms) ...
        assert (await manager.reap_once())["paused"] == [replica.replica_id]
        assert docker_state(manager) == "paused"
        clock.now += 30  # ... and past the fallback freed at once (no pause-then-stop hour under "auto")
        done = await manager.reap_once()
        assert done["stopped"] == [replica.replica_id]
        assert docker_state(manager) == "exited"


async def test_versions_with_nothing_here_are_forgotten_beyond_a_bound(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tenant deploying and calling version after version must not grow the proxy's memory for good:
    pools (with their idle-time histograms) of versions with no replica are kept up to a bound, newest."""
    monkeypatch.setattr("runtime_proxy.replicas.MAX_IDLE_POOLS", 3)
    clock = ManualClock(10_000.0)
    async with manager_on(clock, state_dir) as manager:
        for i in range(10):
            pool = manager._pool(f"acme/m/main/{i}")
            pool.idle.started(float(i))
            pool.idle.finished(float(i))
        waiting = manager._pool("acme/m/main/0")
        waiting.waiting = 1  # a request is waiting on it: never forgotten under it
        manager._prune_pools()
        assert sorted(manager._pools) == ["acme/m/main/0", "acme/m/main/7", "acme/m/main/8", "acme/m/main/9"]
        waiting.waiting = 0
