"""The replica manager: one proxy's replicas of each version, their lifecycle, and chunks on them.

Guarantees: a chunk either gets outputs or a clear ``ApiError`` before its
deadline; a version runs on as many replicas here as its load asks, up to its
``capacity.max`` and the host's budgets (a chunk that finds every replica busy
takes whichever slot frees first; a paused or stopped replica is resumed for it
at once, and another replica is started in the background once the queue would
outlast a start — ``replica.start_pays`` —, or at once when none is here); a replica
that dies fails its in-flight chunks at once (the socket closes) and the next
chunk gets a fresh replica; a version whose replicas fail to start is not
restarted in a tight loop (backoff). Lifecycle moves go through
``lifecycle.transition`` only.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from runtime_proxy import keepwarm, policy
from runtime_proxy.cgroups import container_usage
from runtime_proxy.failures import StartBackoff, exit_error, runtime_error
from runtime_proxy.gpu import GpuCoordinator, NoGpuAvailable
from runtime_proxy.harness_client import HarnessClient, HarnessMisbehaved, HarnessUnavailable
from runtime_proxy.heartbeat import host_resources
from runtime_proxy.images import ImageBook
from runtime_proxy.lifecycle import ADOPTABLE, State
from runtime_proxy.replica import Pulse, Replica, VersionPool
from runtime_proxy.rundirs import RunDirError, RunDirs
from runtime_proxy.runtime import SOCKET_NAME, ExitInfo, LaunchSpec, Runtime, RuntimeFailure
from runtime_proxy.versions import VersionSource
from shared.errors import ApiError, DeadlinePassed, NoCapacity, ReplicaFailed, deadline_exceeded, unavailable
from shared.messages import PATCHABLE_FIELDS, ChunkRequest, ChunkResult, VersionSpec
from shared.settings import ProxySettings

log = logging.getLogger("lukewarm.proxy")

CONTAINER_UID = 65534
STOP_TIMEOUT_S = 5.0
# Versions with no replica here whose pools (and idle-time histograms, ~1 KB each) are kept.
MAX_IDLE_POOLS = 4096
# A start refused because every replica that could make room was busy waits this long for one to end
# before the request gets its 503 (with this as its Retry-After: no longer than the client was told).
ROOM_WAIT_S = 2.0


class RoomBusy(NoCapacity):
    """A start refused for want of an idle replica to make room with (the customer's quota or the host
    full): the same 503 to a caller, after a wait for room (``ROOM_WAIT_S``)."""


def same_image(a: VersionSpec, b: VersionSpec) -> bool:
    """Whether a replica of ``a`` runs ``b``'s code the way ``b`` says (the settings a container is created with)."""
    return (a.image, a.image_id, a.entrypoint, a.env, a.batch_size, a.gpu, a.memory_mb, a.cpus) == \
        (b.image, b.image_id, b.entrypoint, b.env, b.batch_size, b.gpu, b.memory_mb, b.cpus)


def _remaining(deadline: float, now: float) -> float:
    return max(0.0, deadline - now)


def default_memory_budget_mb() -> int:
    """Three quarters of the host's RAM (the rest is for the daemons, the engine and the kernel);
    8 GB where the host's memory cannot be read."""
    return int(host_resources()["memory_mb"]) * 3 // 4 or 8192


class ReplicaManager:
    """Owns this host's replicas. All methods run on the event loop; the runtime bounds its own calls."""

    def __init__(
        self, runtime: Runtime, settings: ProxySettings, harness_path: Path,
        clock: Callable[[], float] = time.monotonic, gpu: GpuCoordinator | None = None,
        versions: VersionSource | None = None,
    ) -> None:
        self.runtime = runtime
        self.settings = settings
        self.harness_path = harness_path
        self.clock = clock
        self.replicas: dict[str, Replica] = {}
        self._pools: dict[str, VersionPool] = {}
        self.backoff = StartBackoff(settings.start_backoff_s)
        self._tasks: set[asyncio.Task[Any]] = set()  # starts and removals in the background, owned here
        self.run_dirs = RunDirs(Path(settings.state_dir) / "run", CONTAINER_UID, settings.run_dir_kb)
        self.gpu = gpu
        self.versions = versions  # the registry's word on what this host's replicas run (retired, patched)
        self.images = ImageBook(settings.image_idle_s, settings.max_images)  # what this proxy ran, pruned
        self._missing_warned: set[str] = set()  # versions whose record is missing, warned about once
        # Starts past _make_room, not registered yet: their customer and memory (MB).
        self._reserved: dict[str, tuple[str, int]] = {}
        # Fired whenever room here may have freed (a call ended, a replica paused or gone, a queue left, a
        # reservation dropped): what starts refused for want of an idle replica wait on (``ROOM_WAIT_S``).
        # Not on every pool change: a refused start must not wake the other refused ones into a loop.
        self._room = Pulse()
        self.memory_budget_mb = settings.memory_budget_mb or default_memory_budget_mb()
        self.customer_quota = settings.max_replicas_per_customer or max(1, settings.max_replicas // 2)

    # ---- public API -------------------------------------------------------

    async def warm(self, spec: VersionSpec, timeout_s: float, replicas: int = 1) -> tuple[str, dict[str, float]]:
        """Make sure ``replicas`` ready replicas of ``spec`` run here (a pre-warm, or the reconciler's
        floor); what the first was when we came, and its phase times."""
        deadline = self.clock() + timeout_s
        held: list[Replica] = []
        kind, timings = "warm", {}
        try:
            # Holding a slot of each keeps the next acquire from reusing it: each round adds a replica.
            for i in range(max(1, min(replicas, self._local_cap(spec)))):
                replica, got, phases = await self._acquire(spec, deadline, may_start=True, fresh=i > 0)
                held.append(replica)
                if i == 0:
                    kind, timings = got, phases
        finally:
            for replica in held:
                self._release(replica)
        return kind, timings

    async def run_chunk(self, req: ChunkRequest, may_start: bool = True,
                        on_start: Callable[[], None] | None = None) -> ChunkResult:
        """Run one chunk on a ready replica of its version; start one (in the background) if all are busy.
        A batch chunk takes a free slot only when no on-demand chunk of the version is waiting for one.
        ``on_start`` is called once the model has the chunk: a cancel before it drops the chunk from the
        queue; after it, the call finishes (the harness runs one at a time) and only then frees its slot."""
        t0 = self.clock()
        deadline = t0 + req.timeout_s
        replica, start_kind, timings = await self._acquire(req.spec, deadline, may_start, batch=req.batch)
        t_infer = self.clock()
        if on_start is not None:
            on_start()
        call = asyncio.ensure_future(self._predict(replica, req.inputs, deadline, req.request_id))
        self._tasks.add(call)
        call.add_done_callback(lambda task: self._predicted(task, replica, req.batch))
        status, body = await asyncio.shield(call)
        timings["infer_ms"] = (self.clock() - t_infer) * 1000
        timings["total_ms"] = (self.clock() - t0) * 1000
        self._pool(req.spec.key).note_infer(timings["infer_ms"])  # how long a chunk holds a slot: start_pays
        if status != 200 or not isinstance(body, dict):
            message = body.get("error") if isinstance(body, dict) else None
            raise ReplicaFailed(str(message or f"the harness answered status {status}")[:500], "harness_error")
        return ChunkResult(
            outputs=body.get("outputs"), stdout=body.get("stdout") or "", stderr=body.get("stderr") or "",
            error=body.get("error"), traceback=body.get("traceback"), start=start_kind, timings=timings,
            proxy_id=self.settings.proxy_id,
        )

    def waiting(self) -> dict[str, int]:
        """Chunks waiting for a slot, per version: demand the replicas here do not meet yet."""
        return {key: pool.waiting for key, pool in self._pools.items() if pool.waiting}

    def snapshot(self) -> list[dict[str, Any]]:
        """Replica states for the heartbeat, with each container's memory and CPU time when its cgroup shows."""
        now = self.clock()
        out = []
        for r in self.replicas.values():
            entry: dict[str, Any] = {
                "replica_id": r.replica_id, "version": r.spec.key, "state": r.state.reported,
                "in_flight": r.in_flight, "idle_s": round(now - r.last_used, 3), "concurrency": r.concurrency,
                "memory_mb": r.spec.memory_mb, "cpus": r.spec.cpus, "gpu": r.spec.gpu, "gpu_uuid": r.gpu_uuid,
            }
            usage = container_usage(r.handle)
            if usage is not None:
                entry["memory_used_mb"], entry["cpu_s"] = usage.memory_mb, usage.cpu_s
            out.append(entry)
        return out

    async def adopt(self) -> int:
        """Re-adopt this proxy's containers from their labels; never restarts a running one."""
        self.run_dirs.prepare()
        found = await self.runtime.list_replicas(self.settings.proxy_id)
        adopted = 0
        for f in found:
            state = ADOPTABLE.get(f.state)
            gpu_taken = f.spec.gpu and bool(self._pool(f.spec.key).replicas)
            if state is None or gpu_taken:
                await self._discard_handle(f.handle, f.run_dir)
                continue
            replica = self._new_replica(f.replica_id, f.spec, f.handle, f.run_dir)
            replica.state = state  # taken over as the engine reports it: not a move of ours
            replica.gpu_uuid = f.gpu_uuid
            self._register(replica)
            if f.gpu_uuid and self.gpu is not None:
                self.gpu.adopt(f.spec.key, f.gpu_uuid, f.handle)
            adopted += 1
        swept = self.run_dirs.sweep(r.run_dir for r in self.replicas.values())
        if swept:
            log.info("removed %d socket directories no replica owns", swept)
        return adopted

    async def reap_once(self) -> dict[str, list[str]]:
        """One round: follow the registry (retired, patched), then the idle policy: pause, stop, remove,
        evict, prune images. Returns what it did."""
        now = self.clock()
        done: dict[str, list[str]] = {"paused": [], "stopped": [], "evicted": [], "dead": await self.check_alive(),
                                      "images": [], "retired": await self.follow_registry()}
        views = [r.view() for r in self.replicas.values()]
        for rid in policy.replicas_to_pause(views, now):
            if await self._freeze(rid, State.PAUSING, State.PAUSED):
                done["paused"].append(rid)
        for rid in policy.replicas_to_stop(views, now, self.settings.pause_stop_after_s):
            if await self._freeze(rid, State.STOPPING, State.STOPPED):
                done["stopped"].append(rid)
        done["removed"], done["prewarmed"] = [], []
        await self._keepwarm_round(now, done)
        views = [r.view() for r in self.replicas.values()]
        for rid in policy.replicas_to_remove(views, now, self.settings.pause_stop_after_s,
                                             self.settings.stop_remove_after_s):
            replica = self.replicas.get(rid)
            if replica is not None and replica.state is State.STOPPED:
                log.info("removing replica %s of %s: stopped and idle long enough", rid, replica.spec.key)
                await self._retire(replica)
                done["removed"].append(rid)
        views = [r.view() for r in self.replicas.values()]
        for rid in policy.replicas_to_evict(views, self.memory_budget_mb, self.settings.max_replicas):
            replica = self.replicas.get(rid)
            if replica is not None:
                log.info("evicting replica %s of %s: the host is over its budgets", rid, replica.spec.key)
                await self._retire(replica)
                done["evicted"].append(rid)
        done["images"] = await self.prune_images(now)
        self._prune_pools()
        return done

    async def _keepwarm_round(self, now: float, done: dict[str, list[str]]) -> None:
        """The "auto" versions' steps (``policy.keepwarm_steps``), each re-checked against the replica now."""
        plans = {}
        for key, pool in self._pools.items():
            live = [r for r in pool.replicas if r.spec.idle_auto]
            plan = pool.idle.plan(live[0].spec.idle_timeout_s, keepwarm.start_lead(pool.start_ms)) if live else None
            if plan is not None:
                plans[key] = plan
        views = [r.view() for r in self.replicas.values()]
        for step, rid in policy.keepwarm_steps(views, plans, now, self.settings.stop_remove_after_s):
            replica = self.replicas.get(rid)
            if replica is None or replica.in_flight:
                continue
            if step == "pause" and await self._freeze(rid, State.PAUSING, State.PAUSED):
                done["paused"].append(rid)
            elif step == "stop":
                # Straight from running when its window ended before the pause was due.
                if replica.state is State.RUNNING:
                    await self._freeze(rid, State.PAUSING, State.PAUSED)
                if await self._freeze(rid, State.STOPPING, State.STOPPED):
                    done["stopped"].append(rid)
            elif step == "prewarm" and replica.state is State.STOPPED and not self._pool(replica.spec.key).having(
                    State.STARTING):
                log.info("pre-warming replica %s of %s: its idle times say a call is due", rid, replica.spec.key)
                replica.move(State.STARTING)
                self._own(self._boot_stopped(replica, self.clock() + self.settings.ready_timeout_s),
                          f"prewarm-{rid}")
                done["prewarmed"].append(rid)
            elif step == "remove" and replica.state is State.STOPPED:
                log.info("removing replica %s of %s: stopped and no call predicted", rid, replica.spec.key)
                await self._retire(replica)
                done["removed"].append(rid)

    def _prune_pools(self) -> None:
        """Forget versions with nothing here (no replica, no waiter) beyond the newest MAX_IDLE_POOLS: a
        tenant deploying version after version must not grow the proxy's memory for good."""
        if len(self._pools) <= MAX_IDLE_POOLS:
            return  # every reaper round: no pass over the pools while they cannot be over the bound
        empty = [(pool.idle.last_call, key) for key, pool in self._pools.items()
                 if not pool.replicas and not pool.waiting]
        for _, key in sorted(empty)[:max(0, len(empty) - MAX_IDLE_POOLS)]:
            del self._pools[key]

    async def follow_registry(self) -> list[str]:
        """Replicas of versions retired (or withdrawn and their number reused) since they started are
        removed once idle; a PATCH of a version's settings (idle timeout, keep-warm, capacity, timeout)
        reaches its replicas here. Re-adopted containers are judged the same way. Returns the removed."""
        if self.versions is None:
            return []
        removed = []
        for key in {r.spec.key for r in self.replicas.values()}:
            try:
                now_spec = await self.versions.current(key)
            except (RedisError, OSError, ValueError):
                continue  # the registry cannot say now: keep running, judge again next round
            if now_spec is None:
                # Retiring and withdrawing leave a record that says so; no record at all means the
                # registry lost its data (a Redis restored empty): keep serving what runs here.
                self._warn_missing(key)
                continue
            self._missing_warned.discard(key)
            for replica in [r for r in self.replicas.values() if r.spec.key == key]:
                if now_spec.retired or now_spec.created_at != replica.spec.created_at:
                    if replica.in_flight == 0 and replica.state is not State.STARTING:
                        log.info("removing replica %s of %s: the version was %s", replica.replica_id, key,
                                 "retired" if now_spec.retired else "deployed again under its number")
                        await self._retire(replica)
                        removed.append(replica.replica_id)
                elif now_spec != replica.spec:
                    replica.spec = dataclasses.replace(
                        replica.spec, **{f: getattr(now_spec, f) for f in PATCHABLE_FIELDS})
        return removed

    def _warn_missing(self, key: str) -> None:
        if key not in self._missing_warned:
            self._missing_warned.add(key)
            log.warning("version %s has no record in the registry (data lost?): its replicas here keep running", key)

    async def prune_images(self, now: float) -> list[str]:
        """Remove model images no replica here uses, least recently used first (``ImageBook``)."""
        return await self.images.prune(self.runtime, ((r.spec.image, r.last_used) for r in self.replicas.values()),
                                       now)

    async def close(self, stop_replicas: bool) -> None:
        """Forget replicas; stop and remove them only when asked (an upgrade keeps them)."""
        for task in list(self._tasks):
            if not task.done() and task.get_name().startswith("start-"):
                task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for replica in list(self.replicas.values()):
            replica.client.close()
            if stop_replicas:
                await self._retire(replica)

    # ---- acquiring a ready replica ---------------------------------------------

    def _pool(self, key: str) -> VersionPool:
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = VersionPool()
        return pool

    def _local_cap(self, spec: VersionSpec) -> int:
        """Replicas of one version this host runs at most: one per GPU model (the coordinator holds one)."""
        return 1 if spec.gpu else max(1, min(spec.capacity.max, self.settings.max_replicas))

    async def _acquire(self, spec: VersionSpec, deadline: float, may_start: bool,
                       fresh: bool = False, batch: bool = False) -> tuple[Replica, str, dict[str, float]]:
        """A replica of ``spec`` with a slot taken for the caller, what the caller met, and start phases.

        ``may_start``: another replica may be started (resumed first) when none has room;
        ``fresh``: one more replica is wanted even if a present one has room (``warm``'s count).
        """
        t0 = self.clock()
        pool = self._pool(spec.key)
        await self._forget_other_code(pool, spec)
        pool.waiting += 1
        pool.waiting_on_demand += 0 if batch else 1
        seen_failure = pool.failure  # only a start that fails while we wait is ours to report
        room_until: float | None = None  # when a start was first refused for want of an idle replica, + wait
        try:
            async with asyncio.timeout(_remaining(deadline, t0)):
                while True:
                    # warm's extra replica: once a fresh one has room, it is the one to take (start no more).
                    fresh = fresh and not any(r.start_kind and r.has_room for r in pool.replicas)
                    yields = batch and pool.waiting_on_demand > 0
                    replica = None if fresh or yields else pool.pick()
                    if replica is not None:
                        return self._take(replica, t0, batch)
                    resumed = None if yields else self._resume_one(pool, deadline)
                    if resumed is not None and resumed.has_room:
                        return self._take(resumed, t0, batch)
                    starting = pool.having(State.STARTING, State.RESUMING)
                    failure = pool.failure
                    if failure is not None and failure is not seen_failure and not starting:
                        if not isinstance(failure, RoomBusy):
                            raise failure
                        # Every replica that could make room was busy: such calls are often over in
                        # milliseconds, so wait (as long as the 503 would have said) for one to end.
                        now = self.clock()
                        room_until = now + ROOM_WAIT_S if room_until is None else room_until
                        if now >= room_until:
                            raise failure
                        seen_failure = failure
                        await self._room.wait(room_until - now)
                        continue
                    recheck_s = None
                    if resumed is None and (may_start or not pool.replicas):
                        # warm's extra replica is asked for: it starts whatever the queue. Otherwise another
                        # replica starts only once the waiters' queue would outlast a start (start_pays).
                        pays, recheck_s = (pool.waiting > pool.coming, None) if fresh else \
                            pool.wants_start(self.clock())
                        if pays:
                            self._start_more(pool, spec, deadline, preempt_batch=not batch)
                    await pool.wait_change(recheck_s)
        except TimeoutError:
            # Queued behind others' chunks or starts: no capacity in time, come back soon.
            raise unavailable("no replica had capacity for this chunk before its deadline", retry_after_s=1) from None
        finally:
            pool.waiting -= 1
            pool.waiting_on_demand -= 0 if batch else 1
            pool.queue_gone()
            if batch is False and pool.waiting:
                pool.changed()  # a batch waiter that yielded to us may go now
            if not pool.waiting:
                self._room.fire()  # this version's idle replicas may make room now that nobody waits on them

    def _take(self, replica: Replica, t0: float, batch: bool = False) -> tuple[Replica, str, dict[str, float]]:
        replica.in_flight += 1
        replica.batch_in_flight += batch
        replica.last_used = self.clock()  # not idle: the reaper must not pause it under us
        self._pool(replica.spec.key).took(replica.last_used)
        kind, timings = replica.take_start()
        if kind == "warm" and replica.state is State.RESUMING:
            kind = "lukewarm"
        timings["queue_ms"] = max(0.0, (self.clock() - t0) * 1000 - sum(timings.values()))
        return replica, kind, timings

    def _predicted(self, task: asyncio.Future[tuple[int, Any]], replica: Replica, batch: bool) -> None:
        self._tasks.discard(task)
        self._release(replica, batch)
        if not task.cancelled():
            task.exception()  # retrieved here: a caller that went away no longer reads it

    def _release(self, replica: Replica, batch: bool = False) -> None:
        replica.in_flight -= 1
        replica.batch_in_flight -= batch
        replica.last_used = self.clock()
        pool = self._pool(replica.spec.key)
        pool.released(replica.last_used)
        pool.changed()
        self._room.fire()

    async def _forget_other_code(self, pool: VersionPool, spec: VersionSpec) -> None:
        """A version number withdrawn after a failed pre-warm and reused names other code: its old
        replicas and its backoff go."""
        for replica in [r for r in pool.replicas if not same_image(r.spec, spec)]:
            await self._retire(replica)
        failed = self.backoff.spec_of(spec.key)
        if failed is not None and not same_image(failed, spec):
            self.backoff.clear(spec.key)
            pool.failure = None

    def _resume_one(self, pool: VersionPool, deadline: float) -> Replica | None:
        """Thaw a paused replica (the chunk is sent while the unpause is in flight: it waits in the
        socket and is answered the moment the process thaws), else boot a stopped one in the background."""
        paused = pool.having(State.PAUSED)
        if paused:
            replica = max(paused, key=lambda r: r.last_used)
            replica.move(State.RESUMING)
            # The first request's own timings: the thaw fills in its phase while that request waits on it.
            timings: dict[str, float] = {}
            replica.start_kind, replica.start_timings = "lukewarm", timings
            replica.resuming = asyncio.create_task(self._thaw(replica, timings), name=f"thaw-{replica.replica_id}")
            return replica
        stopped = pool.having(State.STOPPED)
        if stopped and not pool.having(State.STARTING):
            replica = max(stopped, key=lambda r: r.last_used)
            replica.move(State.STARTING)
            self._own(self._boot_stopped(replica, deadline), f"start-{replica.replica_id}")
        return None

    async def _thaw(self, replica: Replica, timings: dict[str, float]) -> None:
        t = self.clock()
        try:
            await self.runtime.unpause(replica.handle)
        except RuntimeFailure:
            replica.move(State.DEAD)
            self._pool(replica.spec.key).changed()
            raise
        timings["unpause_ms"] = (self.clock() - t) * 1000
        if replica.state is State.RESUMING:
            replica.move(State.RUNNING)
        self._pool(replica.spec.key).changed()

    async def _boot_stopped(self, replica: Replica, deadline: float) -> None:
        """A stopped replica started again (lukewarm); one that will not come back is retired."""
        pool = self._pool(replica.spec.key)
        try:
            await self._boot(replica, deadline, replica.start_timings)
            replica.start_kind = "lukewarm"
        except ApiError as exc:
            log.info("stopped replica %s of %s did not come back: %s", replica.replica_id, replica.spec.key, exc)
        finally:
            pool.changed()

    def _start_more(self, pool: VersionPool, spec: VersionSpec, deadline: float, preempt_batch: bool = False) -> None:
        """Start one more replica in the background when the version and the host allow it.

        Within a failed version's backoff nothing starts: the caller gets the failure at once when
        no replica here could serve it, else it waits for a busy one.
        """
        live = [r for r in pool.replicas if r.state is not State.DEAD]
        if len(live) >= self._local_cap(spec):
            return
        refusal = self.backoff.refusal(spec.key, self.clock())
        if refusal is not None:
            if not live:
                raise refusal
            return
        replica_id = uuid.uuid4().hex[:12]
        self._own(self._start_for(pool, spec, replica_id, deadline, preempt_batch), f"start-{replica_id}")
        # Count it as coming at once, so that concurrent waiters do not each start one.
        pool.replicas.append(_placeholder(replica_id, spec, self.settings, self.clock()))

    async def _start_for(self, pool: VersionPool, spec: VersionSpec, replica_id: str, deadline: float,
                         preempt_batch: bool) -> None:
        placeholder = next(r for r in pool.replicas if r.replica_id == replica_id)
        try:
            replica = await self._start(spec, deadline, replica_id, preempt_batch)
        except ApiError as exc:
            if not isinstance(exc, (NoCapacity, DeadlinePassed)):  # the host was full or slow: not the version's fault
                self.backoff.record(spec, exc, self.clock())
            pool.failure = exc
        except asyncio.CancelledError:
            raise
        else:
            self.backoff.clear(spec.key)
            pool.failure = None
            replica.start_kind = "cold"
            self._room.fire()  # this version's own waiters for room may have a replica now
            # What another start would cost (the image is here now: its pull is not part of that).
            pool.note_start(sum(v for k, v in replica.start_timings.items() if k != "pull_ms"))
            log.info("started replica %s of %s cold in %.0f ms (%s)", replica_id, spec.key,
                     sum(replica.start_timings.values()),
                     ", ".join(f"{k} {v:.0f}" for k, v in replica.start_timings.items()))
        finally:
            if placeholder in pool.replicas:
                pool.replicas.remove(placeholder)
            pool.changed()

    async def _start(self, spec: VersionSpec, deadline: float, replica_id: str, preempt_batch: bool = False) -> Replica:
        timings: dict[str, float] = {}
        try:
            await self._make_room(spec, replica_id, preempt_batch)
            return await self._create_and_boot(spec, deadline, replica_id, timings)
        finally:
            if self._reserved.pop(replica_id, None) is not None:
                self._room.fire()  # the start failed or was cancelled: its room is free (a refused one held none)

    async def _create_and_boot(self, spec: VersionSpec, deadline: float, replica_id: str,
                               timings: dict[str, float]) -> Replica:
        t = self.clock()
        try:
            pinned = spec.image_id or spec.image
            if not await self.runtime.has_image(pinned):
                # A digest reference (name@sha256:…) pulls exactly the pinned content on any host; a
                # content id cannot be pulled, so the tag is, and must still hold it (checked below).
                await self.runtime.pull(pinned if "@" in pinned else spec.image)
                timings["pull_ms"] = (self.clock() - t) * 1000
                if spec.image_id and not await self.runtime.has_image(spec.image_id):
                    raise RuntimeFailure("image_unavailable", f"{spec.image} no longer holds {spec.image_id}")
        except RuntimeFailure as exc:
            raise runtime_error(exc, spec) from None
        gpu_uuid = await self._acquire_gpu(spec, deadline, timings) if spec.gpu else None
        try:
            run_dir = self.run_dirs.make(replica_id)
        except RunDirError as exc:
            if self.gpu is not None and gpu_uuid:
                self.gpu.release(spec.key)
            raise ReplicaFailed(str(exc), "runtime_error") from None
        launch = LaunchSpec(replica_id=replica_id, spec=spec, proxy_id=self.settings.proxy_id,
                            run_dir=run_dir, harness_path=self.harness_path, gpu_uuid=gpu_uuid)
        t = self.clock()
        try:
            handle = await self.runtime.create(launch)
        except RuntimeFailure as exc:
            self.run_dirs.remove(run_dir)
            if self.gpu is not None and gpu_uuid:
                self.gpu.release(spec.key)
            raise runtime_error(exc, spec) from None
        timings["create_ms"] = (self.clock() - t) * 1000
        replica = self._new_replica(replica_id, spec, handle, run_dir)
        replica.gpu_uuid = gpu_uuid
        self._register(replica)
        self._reserved.pop(replica_id, None)  # counted as a live replica from here
        if self.gpu is not None and gpu_uuid:
            self.gpu.note_container(spec.key, handle)
        await self._boot(replica, deadline, timings)
        replica.start_timings = timings
        return replica

    async def _boot(self, replica: Replica, deadline: float, timings: dict[str, float]) -> None:
        """Start a created or stopped replica and wait until its harness is ready; retire it on failure."""
        try:
            t = self.clock()
            await self.runtime.start(replica.handle)
            timings["start_ms"] = (self.clock() - t) * 1000
            t = self.clock()
            await self._wait_ready(replica, min(deadline, t + self.settings.ready_timeout_s))
            timings["ready_ms"] = (self.clock() - t) * 1000
        except RuntimeFailure as exc:
            await self._retire(replica)
            raise runtime_error(exc, replica.spec) from None
        except BaseException:
            await self._retire(replica)
            raise
        replica.move(State.RUNNING)
        replica.started_at = replica.last_used = self.clock()

    async def _acquire_gpu(self, spec: VersionSpec, deadline: float, timings: dict[str, float]) -> str:
        """A GPU for ``spec`` alone: another GPU version may be drained, stopped and waited out first."""
        if self.gpu is None:
            raise NoGpuAvailable("GPU support is off on this proxy")
        t = self.clock()
        gpu_uuid = await self.gpu.acquire(spec.key, deadline, self._stop_gpu_holder, self._kill_gpu_holder)
        timings["gpu_ms"] = (self.clock() - t) * 1000
        return gpu_uuid

    def _replica_by_handle(self, handle: str) -> Replica | None:
        return next((r for r in self.replicas.values() if r.handle.startswith(handle) or handle.startswith(r.handle)),
                    None)

    async def _stop_gpu_holder(self, handle: str) -> None:
        """Drain a GPU holder (no new chunks; in-flight ones finish), then stop and remove it.

        Pausing would keep its GPU memory: a swap always stops.
        """
        replica = self._replica_by_handle(handle)
        if replica is not None:
            self._forget(replica)
            until = self.clock() + max(0.0, replica.spec.timeout_s)
            while replica.in_flight and self.clock() < until:
                await asyncio.sleep(0.01)
            replica.move(State.DEAD)
        await self.runtime.stop(handle, STOP_TIMEOUT_S)
        if await self.runtime.exit_info(handle) is not None:
            await self._discard_handle(handle, replica.run_dir if replica else Path(""))
        # else it outlived its stop: the coordinator's kill (after the release timeout) removes it

    async def _kill_gpu_holder(self, handle: str) -> None:
        await self.runtime.kill(handle)
        await self._discard_handle(handle, Path(""))

    def gpu_usage(self, version_key: str) -> tuple[int, float | None]:
        """(in flight, last used) of a version's replicas here, for the GPU coordinator's choice."""
        replicas = self._pool(version_key).replicas
        if not replicas:
            return 0, None
        busy = sum(r.in_flight + (1 if r.state is State.STARTING else 0) for r in replicas)
        return busy, max(r.last_used for r in replicas)

    async def _make_room(self, spec: VersionSpec, replica_id: str, preempt_batch: bool = False) -> None:
        """Fit one more replica of ``spec``: the customer's quota first, then the host's memory and count.

        Decided, and the room reserved, before the first await: a start that runs while the victims'
        containers are removed sees the room taken. (Reserved after those awaits, it was taken by whichever
        start came meanwhile, and the one that evicted was refused: a model could starve another so.)

        For on-demand work (``preempt_batch``) a replica busy only with batch work counts as idle: on a
        full host it may be evicted, its batch chunks answered 503 ``preempted`` (retry later).
        """
        if spec.memory_mb > self.memory_budget_mb:
            raise unavailable(f"this version needs {spec.memory_mb} MB; this host offers {self.memory_budget_mb} MB", 30)
        starting = sum(1 for customer, _ in self._reserved.values() if customer == spec.customer)
        mine = policy.quota_evictions(self._eviction_views(), spec.customer, self.customer_quota, starting)
        if mine is None:
            raise RoomBusy("this customer's replicas on this host are all busy", retry_after_s=ROOM_WAIT_S)
        reserved_mb = sum(mb for _, mb in self._reserved.values())
        others = [v for v in self._eviction_views(preempt_batch) if v.replica_id not in mine]
        evict = policy.replicas_to_evict(others, self.memory_budget_mb, self.settings.max_replicas,
                                         incoming_mb=spec.memory_mb + reserved_mb, evict_running=True,
                                         incoming=1 + len(self._reserved))
        gone = {*mine, *evict}
        live = [r for r in self.replicas.values() if r.state.live and r.replica_id not in gone]
        if not policy.fits(len(live) + len(self._reserved), sum(r.spec.memory_mb for r in live) + reserved_mb,
                           spec.memory_mb, self.settings.max_replicas, self.memory_budget_mb):
            raise RoomBusy("this host is full and every replica on it is busy", retry_after_s=ROOM_WAIT_S)
        # Held until the replica is registered: a start running meanwhile (the removals below, the image
        # check and the container's creation await) must count this one, or both pass and the host holds
        # one too many.
        self._reserved[replica_id] = (spec.customer, spec.memory_mb)
        victims = [self.replicas[rid] for rid in (*mine, *evict)]
        for victim in victims:
            if victim.replica_id in mine:
                log.info("evicting replica %s of %s: the customer's quota on this host, for %s", victim.replica_id,
                         victim.spec.key, spec.key)
            elif victim.batch_in_flight:
                log.info("replica %s of %s preempted from batch work for on-demand %s", victim.replica_id,
                         victim.spec.key, spec.key)
                victim.preempted = True
            else:
                log.info("evicting idle replica %s of %s to make room for %s", victim.replica_id, victim.spec.key,
                         spec.key)
            victim.move(State.DEAD)
            self._forget(victim)
        if victims:
            # Owned, and shielded from this start's cancellation: a victim is forgotten already, so its
            # container must go whatever becomes of the start. The start waits for them: their memory is real.
            removals = [self._own(self._discard_handle(v.handle, v.run_dir), f"remove-{v.replica_id}") for v in victims]
            await asyncio.shield(asyncio.gather(*removals))

    def _eviction_views(self, preempt_batch: bool = False) -> list[policy.ReplicaView]:
        """Replica views where one that requests are waiting on counts as busy (not evictable); with
        ``preempt_batch`` one busy with batch work only (and no on-demand waiter) counts as idle."""
        views = []
        for r in self.replicas.values():
            view = r.view()
            pool = self._pool(r.spec.key)
            if preempt_batch and r.in_flight == r.batch_in_flight and not pool.waiting_on_demand:
                view = dataclasses.replace(view, in_flight=0)
                waited = False
            else:
                waited = bool(pool.waiting)
            if view.in_flight == 0 and (waited or r.state in (State.PAUSING, State.RESUMING)):
                view = dataclasses.replace(view, in_flight=1)
            views.append(view)
        return views

    async def _wait_ready(self, replica: Replica, until: float) -> None:
        """Poll the harness's /ready until it answers, fails, or the replica exits."""
        delay_s = 0.005
        while True:
            status, body = None, None
            try:
                status, body = await asyncio.wait_for(replica.client.call("GET", "/ready"), 2.0)
            except (HarnessUnavailable, TimeoutError):
                pass
            except HarnessMisbehaved as exc:
                raise ReplicaFailed(str(exc), exc.type) from None
            if status == 200:
                return
            if status == 500 and isinstance(body, dict):
                raise ReplicaFailed(str(body.get("error") or "the model failed to load")[:500], "model_load_failed")
            if status is None:
                info = await self.runtime.exit_info(replica.handle)
                if info is not None:
                    raise exit_error(info, "before it was ready")
            if self.clock() >= until:
                raise DeadlinePassed("the replica did not get ready in time")
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 1.5, 0.05)

    # ---- running a chunk -----------------------------------------------------

    async def _predict(self, replica: Replica, inputs: list[Any], deadline: float,
                       request_id: str = "") -> tuple[int, Any]:
        try:
            async with asyncio.timeout(_remaining(deadline, self.clock())):
                payload = {"inputs": inputs, "request_id": request_id} if request_id else {"inputs": inputs}
                call = asyncio.ensure_future(replica.client.call("POST", "/predict", payload))
                if replica.resuming is not None:
                    await self._await_resume(replica, call)
                return await call
        except TimeoutError:
            # A stuck model keeps its slot forever: replace the replica, do not wait for it.
            self._retire_later(replica)
            raise deadline_exceeded() from None
        except HarnessMisbehaved as exc:
            if exc.type != "response_too_large":
                self._retire_later(replica)  # what answers there is not an honest harness any more
            raise ReplicaFailed(str(exc), exc.type) from None
        except HarnessUnavailable:
            if replica.preempted:
                raise NoCapacity("this batch work was preempted by on-demand work on a full host", "preempted",
                                 retry_after_s=2) from None
            replica.move(State.DEAD)
            info = await self._wait_exit(replica)
            self._retire_later(replica)
            if info is None:
                raise ReplicaFailed("the replica dropped the connection mid-request") from None
            raise exit_error(info, "mid-request") from None

    async def _await_resume(self, replica: Replica, call: asyncio.Future[tuple[int, Any]]) -> None:
        resuming = replica.resuming
        assert resuming is not None
        try:
            await asyncio.shield(resuming)
        except RuntimeFailure as exc:
            call.cancel()
            self._retire_later(replica)
            log.warning("could not resume replica %s: %s", replica.replica_id, exc)
            raise ReplicaFailed("the paused replica could not be resumed") from None
        except BaseException:
            call.cancel()
            raise
        if replica.resuming is resuming:
            replica.resuming = None

    async def _wait_exit(self, replica: Replica, bound_s: float = 2.0) -> ExitInfo | None:
        """The exit of a replica whose socket closed; the engine may take a moment to notice."""
        until = self.clock() + bound_s
        while True:
            try:
                info = await self.runtime.exit_info(replica.handle)
            except RuntimeFailure:
                info = None
            if info is not None or self.clock() >= until:
                return info
            await asyncio.sleep(0.02)

    # ---- bookkeeping ---------------------------------------------------------

    def _new_replica(self, replica_id: str, spec: VersionSpec, handle: str, run_dir: Path) -> Replica:
        now = self.clock()
        concurrency = spec.max_concurrency or self.settings.replica_concurrency
        return Replica(
            replica_id=replica_id, spec=spec, handle=handle, run_dir=run_dir, concurrency=concurrency,
            client=HarnessClient(str(run_dir / SOCKET_NAME), max_idle=concurrency,
                                 max_response_bytes=self.settings.max_response_mb * 2**20,
                                 peer_ok=functools.partial(self.runtime.owns_peer, handle)),
            last_used=now, started_at=now,
        )

    def _register(self, replica: Replica) -> None:
        self.replicas[replica.replica_id] = replica
        pool = self._pool(replica.spec.key)
        pool.replicas = [r for r in pool.replicas if r.replica_id != replica.replica_id] + [replica]

    def _own(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _freeze(self, replica_id: str, during: State, after: State) -> bool:
        """Pause (or stop) an idle replica; the ``…ING`` state keeps requests off it meanwhile."""
        replica = self.replicas.get(replica_id)
        wanted_from = State.RUNNING if after is State.PAUSED else State.PAUSED
        if replica is None or replica.in_flight or replica.state is not wanted_from:
            return False
        if self._pool(replica.spec.key).waiting:
            return False  # requests are waiting for this version: not idle
        replica.move(during)
        try:
            if after is State.PAUSED:
                await self.runtime.pause(replica.handle)
            else:
                await self.runtime.stop(replica.handle, STOP_TIMEOUT_S)
                replica.client.close()
        except RuntimeFailure as exc:
            log.warning("could not %s replica %s: %s", after.value, replica_id, exc)
            if exc.type == "pause_refused" and replica.state is during:
                replica.move(State.RUNNING)  # thawed again, whole: it serves on and is paused another time
                self._pool(replica.spec.key).changed()
            else:
                await self._retire(replica)
            return False
        if replica.state is during:
            replica.move(after)
        log.info("%s replica %s of %s after %.1f s idle", after.value, replica_id, replica.spec.key,
                 self.clock() - replica.last_used)
        self._pool(replica.spec.key).changed()
        self._room.fire()
        return True

    async def check_alive(self) -> list[str]:
        """Retire idle replicas whose process died while nobody was talking to them."""
        dead: list[str] = []
        idle = [r for r in self.replicas.values() if not r.in_flight and r.state in (State.RUNNING, State.PAUSED)]
        try:
            gone = await self.runtime.exited([r.handle for r in idle])
        except RuntimeFailure:
            return dead
        for replica in idle:
            if replica.handle not in gone:
                continue
            try:
                info = await self.runtime.exit_info(replica.handle)
            except RuntimeFailure:
                continue
            if info is not None and replica.in_flight == 0 and self.replicas.get(replica.replica_id) is replica:
                log.warning("replica %s of %s exited while idle (code %s)", replica.replica_id, replica.spec.key,
                            info.exit_code)
                await self._retire(replica)
                dead.append(replica.replica_id)
        return dead

    def _forget(self, replica: Replica) -> None:
        self.images.note(replica.spec.image, replica.last_used)
        self.replicas.pop(replica.replica_id, None)
        pool = self._pool(replica.spec.key)
        if replica in pool.replicas:
            pool.replicas.remove(replica)
            if replica.gpu_uuid and self.gpu is not None:
                self.gpu.release(replica.spec.key)
        replica.client.close()
        pool.changed()
        self._room.fire()

    async def _retire(self, replica: Replica) -> None:
        """Forget a replica and remove its container; never raises."""
        replica.move(State.DEAD)
        self._forget(replica)
        await self._discard_handle(replica.handle, replica.run_dir)

    def _retire_later(self, replica: Replica) -> None:
        replica.move(State.DEAD)
        self._forget(replica)
        self._own(self._discard_handle(replica.handle, replica.run_dir), f"remove-{replica.replica_id}")

    async def _discard_handle(self, handle: str, run_dir: Path) -> None:
        try:
            await self.runtime.remove(handle)
        except RuntimeFailure as exc:
            log.warning("could not remove replica %s: %s", handle, exc)
        if run_dir and str(run_dir):
            self.run_dirs.remove(run_dir)


def _placeholder(replica_id: str, spec: VersionSpec, settings: ProxySettings, now: float) -> Replica:
    """A replica being started, before it has a container: it counts as coming, takes no requests."""
    return Replica(replica_id=replica_id, spec=spec, handle="", run_dir=Path(""),
                   client=HarnessClient("", max_idle=0),
                   concurrency=spec.max_concurrency or settings.replica_concurrency, last_used=now, started_at=now)
