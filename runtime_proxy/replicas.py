"""The replica manager: one proxy's replicas, their lifecycle, and running chunks on them.

Guarantees: a chunk either gets outputs or a clear ``ApiError`` before its
deadline; a replica that dies fails its in-flight chunks at once (the
socket closes) and the next chunk gets a fresh replica; a version whose
replicas fail to start is not restarted in a tight loop (backoff).
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

from runtime_proxy import policy
from runtime_proxy.cgroups import container_usage
from runtime_proxy.gpu import GpuCoordinator, NoGpuAvailable
from runtime_proxy.harness_client import HarnessClient, HarnessMisbehaved, HarnessUnavailable
from runtime_proxy.rundirs import RunDirError, RunDirs
from runtime_proxy.runtime import SOCKET_NAME, ExitInfo, LaunchSpec, Runtime, RuntimeFailure
from shared.errors import ApiError, deadline_exceeded, unavailable
from shared.messages import ChunkRequest, ChunkResult, VersionSpec
from shared.settings import ProxySettings

log = logging.getLogger("lukewarm.proxy")

CONTAINER_UID = 65534
# Container states a restarted proxy takes over, as replica states. An exited one is a stopped
# replica (lukewarm): started again on demand, and retired if it fails to come up.
ADOPTABLE = {"running": "running", "paused": "paused", "exited": "stopped"}
STOP_TIMEOUT_S = 5.0


@dataclasses.dataclass(eq=False)
class Replica:
    """One container (or process) of one version on this host."""

    replica_id: str
    spec: VersionSpec
    handle: str
    run_dir: Path
    client: HarnessClient
    slots: asyncio.Semaphore
    state: str = "starting"  # starting | running | paused | stopped | dead
    last_used: float = 0.0
    in_flight: int = 0
    started_at: float = 0.0
    gpu_uuid: str | None = None
    resuming: asyncio.Task[None] | None = None  # an unpause in flight

    def view(self) -> policy.ReplicaView:
        return policy.ReplicaView(
            replica_id=self.replica_id, version_key=self.spec.key, state=self.state,
            in_flight=self.in_flight, last_used=self.last_used,
            idle_timeout_s=self.spec.idle_timeout_s, keep_warm=self.spec.keep_warm,
            memory_mb=self.spec.memory_mb,
        )


@dataclasses.dataclass
class _Failure:
    count: int
    until: float
    error: ApiError
    spec: VersionSpec


def same_image(a: VersionSpec, b: VersionSpec) -> bool:
    """Whether a replica of ``a`` runs ``b``'s code the way ``b`` says (the settings a container is created with)."""
    return (a.image, a.image_id, a.entrypoint, a.env, a.batch_size, a.gpu, a.memory_mb, a.cpus) == \
        (b.image, b.image_id, b.entrypoint, b.env, b.batch_size, b.gpu, b.memory_mb, b.cpus)


def _remaining(deadline: float, now: float) -> float:
    return max(0.0, deadline - now)


# What a caller is told when the engine fails: one line, no host paths or engine text (those go to the log).
RUNTIME_MESSAGES = {
    "image_unavailable": "the model's image {image} is not available on this host",
    "replica_gone": "the replica disappeared while it was being started",
    "image_build_failed": "the model's image could not be built",
}


def default_memory_budget_mb() -> int:
    """Three quarters of the host's RAM: the rest is for the daemons, the engine and the kernel."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 3 // 4 // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 8192


def runtime_error(exc: RuntimeFailure, subject: VersionSpec | str) -> ApiError:
    """The caller's one line for an engine failure about a version (or an image); the detail is logged."""
    image = subject.image if isinstance(subject, VersionSpec) else subject
    log.warning("runtime failure for %s: %s: %s", subject.key if isinstance(subject, VersionSpec) else image,
                exc.type, exc)
    message = RUNTIME_MESSAGES.get(exc.type, "the container engine could not run this replica")
    return ApiError(502, exc.type, message.format(image=image))


class ReplicaManager:
    """Owns this host's replicas. All methods run on the event loop; the runtime bounds its own calls."""

    def __init__(
        self, runtime: Runtime, settings: ProxySettings, harness_path: Path,
        clock: Callable[[], float] = time.monotonic, gpu: GpuCoordinator | None = None,
    ) -> None:
        self.runtime = runtime
        self.settings = settings
        self.harness_path = harness_path
        self.clock = clock
        self.replicas: dict[str, Replica] = {}
        self._by_version: dict[str, Replica] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._failures: dict[str, _Failure] = {}
        self._cleanup_tasks: set[asyncio.Task[None]] = set()
        self.run_dirs = RunDirs(Path(settings.state_dir) / "run", CONTAINER_UID, settings.run_dir_kb)
        self.gpu = gpu
        self.image_last_used: dict[str, float] = {}  # images this proxy ran (pruned by the reaper)
        self.memory_budget_mb = settings.memory_budget_mb or default_memory_budget_mb()
        self.customer_quota = settings.max_replicas_per_customer or max(1, settings.max_replicas // 2)

    # ---- public API -------------------------------------------------------

    async def warm(self, spec: VersionSpec, timeout_s: float) -> tuple[str, dict[str, float]]:
        """Make sure a ready replica of ``spec`` runs here (a deploy's pre-warm); what it was, and phase times."""
        replica, kind, timings = await self._acquire(spec, self.clock() + timeout_s)
        replica.slots.release()
        return kind, timings

    async def run_chunk(self, req: ChunkRequest) -> ChunkResult:
        """Run one chunk on a ready replica of its version; start one if needed."""
        t0 = self.clock()
        deadline = t0 + req.timeout_s
        replica, start_kind, timings = await self._acquire(req.spec, deadline)
        replica.in_flight += 1
        t_infer = self.clock()
        try:
            status, body = await self._predict(replica, req.inputs, deadline)
        finally:
            replica.in_flight -= 1
            replica.last_used = self.clock()
            replica.slots.release()
        timings["infer_ms"] = (self.clock() - t_infer) * 1000
        timings["total_ms"] = (self.clock() - t0) * 1000
        if status != 200 or not isinstance(body, dict):
            message = body.get("error") if isinstance(body, dict) else None
            raise ApiError(502, "harness_error", message or f"the harness answered status {status}")
        return ChunkResult(
            outputs=body.get("outputs"), stdout=body.get("stdout") or "", stderr=body.get("stderr") or "",
            error=body.get("error"), traceback=body.get("traceback"), start=start_kind, timings=timings,
            proxy_id=self.settings.proxy_id,
        )

    def snapshot(self) -> list[dict[str, Any]]:
        """Replica states for the heartbeat, with each container's memory and CPU time when its cgroup shows."""
        now = self.clock()
        out = []
        for r in self.replicas.values():
            entry: dict[str, Any] = {
                "replica_id": r.replica_id, "version": r.spec.key, "state": r.state, "in_flight": r.in_flight,
                "idle_s": round(now - r.last_used, 3), "concurrency": self.settings.replica_concurrency,
                "memory_mb": r.spec.memory_mb, "gpu": r.spec.gpu, "gpu_uuid": r.gpu_uuid,
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
            if state is None or f.spec.key in self._by_version:
                await self._discard_handle(f.handle, f.run_dir)
                continue
            replica = self._new_replica(f.replica_id, f.spec, f.handle, f.run_dir)
            replica.state = state
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
        """Apply the idle policy once: pause, stop, evict. Returns what it did."""
        now = self.clock()
        views = [r.view() for r in self.replicas.values()]
        done: dict[str, list[str]] = {"paused": [], "stopped": [], "evicted": [], "dead": await self.check_alive(),
                                      "images": []}
        for rid in policy.replicas_to_pause(views, now):
            if await self._transition(rid, "pause"):
                done["paused"].append(rid)
        for rid in policy.replicas_to_stop(views, now, self.settings.pause_stop_after_s):
            if await self._transition(rid, "stop"):
                done["stopped"].append(rid)
        views = [r.view() for r in self.replicas.values()]
        for rid in policy.replicas_to_evict(views, self.memory_budget_mb, self.settings.max_replicas):
            replica = self.replicas.get(rid)
            if replica is not None:
                await self._retire(replica)
                done["evicted"].append(rid)
        done["images"] = await self.prune_images(now)
        return done

    async def prune_images(self, now: float) -> list[str]:
        """Remove model images no replica here uses, least recently used first (policy.images_to_prune)."""
        for replica in self.replicas.values():
            self.image_last_used[replica.spec.image] = max(self.image_last_used.get(replica.spec.image, 0.0),
                                                           replica.last_used)
        in_use = {r.spec.image for r in self.replicas.values()}
        pruned = []
        for image in policy.images_to_prune(self.image_last_used, in_use, now, self.settings.image_idle_s,
                                            self.settings.max_images):
            try:
                await self.runtime.remove_image(image)
            except RuntimeFailure as exc:
                log.warning("could not remove image %s: %s", image, exc)
                continue
            del self.image_last_used[image]
            pruned.append(image)
        return pruned

    async def close(self, stop_replicas: bool) -> None:
        """Forget replicas; stop and remove them only when asked (an upgrade keeps them)."""
        if self._cleanup_tasks:
            await asyncio.gather(*self._cleanup_tasks, return_exceptions=True)
        for replica in list(self.replicas.values()):
            replica.client.close()
            if stop_replicas:
                await self._retire(replica)

    # ---- acquiring a ready replica ---------------------------------------------

    async def _acquire(self, spec: VersionSpec, deadline: float) -> tuple[Replica, str, dict[str, float]]:
        """A ready replica with a free slot (taken), what it was when we came, and phase times."""
        timings: dict[str, float] = {}
        lock = self._locks.setdefault(spec.key, asyncio.Lock())
        t0 = self.clock()
        try:
            async with asyncio.timeout(_remaining(deadline, t0)):
                async with lock:
                    replica, kind = await self._ensure_ready(spec, deadline, timings)
                await replica.slots.acquire()
        except TimeoutError:
            # Queued behind others' starts or chunks: no capacity in time, come back soon.
            raise unavailable("no replica had capacity for this chunk before its deadline", retry_after_s=1) from None
        timings["queue_ms"] = (self.clock() - t0) * 1000 - sum(timings.values())
        return replica, kind, timings

    async def _ensure_ready(self, spec: VersionSpec, deadline: float, timings: dict[str, float]) -> tuple[Replica, str]:
        replica = self._by_version.get(spec.key)
        if replica is not None and not same_image(replica.spec, spec):
            # A version number withdrawn after a failed pre-warm was reused for other code.
            await self._retire(replica)
            replica = None
        if replica is not None:
            replica.last_used = self.clock()  # not idle: the reaper must not pause it under us
        if replica is not None and replica.state == "running":
            return replica, "warm"
        if replica is not None and replica.state == "paused":
            # The request is sent while the unpause is in flight: it waits in the
            # socket's buffer and is answered the moment the process thaws.
            replica.resuming = asyncio.create_task(self._resume(replica, timings))
            replica.state = "running"
            return replica, "lukewarm"
        if replica is not None and replica.state == "stopped":
            try:
                await self._boot(replica, deadline, timings)
                return replica, "lukewarm"
            except ApiError:
                pass  # a stopped replica that will not come back: start afresh below
        if replica is not None:
            await self._retire(replica)
        self._check_backoff(spec)
        try:
            replica = await self._start(spec, deadline, timings)
        except ApiError as exc:
            if exc.status != 504:
                self._record_failure(spec, exc)
            raise
        self._failures.pop(spec.key, None)
        return replica, "cold"

    async def _resume(self, replica: Replica, timings: dict[str, float]) -> None:
        t = self.clock()
        await self.runtime.unpause(replica.handle)
        timings["unpause_ms"] = (self.clock() - t) * 1000

    def _check_backoff(self, spec: VersionSpec) -> None:
        failure = self._failures.get(spec.key)
        if failure is not None and not same_image(failure.spec, spec):
            del self._failures[spec.key]  # the number now names other code: a clean slate
            failure = None
        if failure is not None and self.clock() < failure.until:
            wait_s = failure.until - self.clock()
            raise ApiError(
                failure.error.status, failure.error.type,
                f"{failure.error.message} (not retried for {wait_s:.0f} s)",
                {"Retry-After": str(max(1, round(wait_s)))},
            )

    def _record_failure(self, spec: VersionSpec, error: ApiError) -> None:
        count = self._failures[spec.key].count + 1 if spec.key in self._failures else 1
        until = self.clock() + policy.backoff_s(count, self.settings.start_backoff_s)
        self._failures[spec.key] = _Failure(count=count, until=until, error=error, spec=spec)

    async def _start(self, spec: VersionSpec, deadline: float, timings: dict[str, float]) -> Replica:
        await self._make_room(spec)
        t = self.clock()
        try:
            if not await self.runtime.has_image(spec.image_id or spec.image):
                await self.runtime.pull(spec.image)
                timings["pull_ms"] = (self.clock() - t) * 1000
                if spec.image_id and not await self.runtime.has_image(spec.image_id):
                    raise RuntimeFailure("image_unavailable", f"{spec.image} no longer holds {spec.image_id}")
        except RuntimeFailure as exc:
            raise runtime_error(exc, spec) from None
        gpu_uuid = await self._acquire_gpu(spec, deadline, timings) if spec.gpu else None
        replica_id = uuid.uuid4().hex[:12]
        try:
            run_dir = self.run_dirs.make(replica_id)
        except RunDirError as exc:
            if self.gpu is not None and gpu_uuid:
                self.gpu.release(spec.key)
            raise ApiError(502, "runtime_error", str(exc)) from None
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
        if self.gpu is not None and gpu_uuid:
            self.gpu.note_container(spec.key, handle)
        await self._boot(replica, deadline, timings)
        return replica

    async def _boot(self, replica: Replica, deadline: float, timings: dict[str, float]) -> None:
        """Start a created or stopped replica and wait until its harness is ready; retire it on failure."""
        replica.state = "starting"
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
        replica.state = "running"
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
            replica.state = "dead"
        await self.runtime.stop(handle, STOP_TIMEOUT_S)
        if await self.runtime.exit_info(handle) is not None:
            await self._discard_handle(handle, replica.run_dir if replica else Path(""))
        # else it outlived its stop: the coordinator's kill (after the release timeout) removes it

    async def _kill_gpu_holder(self, handle: str) -> None:
        await self.runtime.kill(handle)
        await self._discard_handle(handle, Path(""))

    def gpu_usage(self, version_key: str) -> tuple[int, float | None]:
        """(in flight, last used) of a version's replica here, for the GPU coordinator's choice."""
        replica = self._by_version.get(version_key)
        if replica is None:
            return 0, None
        busy = replica.in_flight + (1 if replica.state == "starting" else 0)
        return busy, replica.last_used

    async def _make_room(self, spec: VersionSpec) -> None:
        """Fit one more replica of ``spec``: the customer's quota first, then the host's memory and count."""
        if spec.memory_mb > self.memory_budget_mb:
            raise unavailable(f"this version needs {spec.memory_mb} MB; this host offers {self.memory_budget_mb} MB", 30)
        views = self._eviction_views()
        mine = policy.quota_evictions(views, spec.customer, self.customer_quota)
        if mine is None:
            raise unavailable("this customer's replicas on this host are all busy", retry_after_s=2)
        for rid in mine:
            await self._retire(self.replicas[rid])
        evict = policy.replicas_to_evict(self._eviction_views(), self.memory_budget_mb, self.settings.max_replicas,
                                         incoming_mb=spec.memory_mb, evict_running=True)
        for rid in evict:
            await self._retire(self.replicas[rid])
        live = [r for r in self.replicas.values() if r.state in {"starting", "running", "paused"}]
        if len(live) >= self.settings.max_replicas or \
                sum(r.spec.memory_mb for r in live) + spec.memory_mb > self.memory_budget_mb:
            raise unavailable("this host is full and every replica on it is busy", retry_after_s=2)

    def _eviction_views(self) -> list[policy.ReplicaView]:
        """Replica views where one a request is acquiring right now counts as busy (not evictable)."""
        views = []
        for r in self.replicas.values():
            view = r.view()
            lock = self._locks.get(r.spec.key)
            if view.in_flight == 0 and ((lock is not None and lock.locked()) or r.slots.locked()):
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
                raise ApiError(502, exc.type, str(exc)) from None
            if status == 200:
                return
            if status == 500 and isinstance(body, dict):
                raise ApiError(502, "model_load_failed", str(body.get("error") or "the model failed to load")[:500])
            if status is None:
                info = await self.runtime.exit_info(replica.handle)
                if info is not None:
                    raise self._exit_error(info, "before it was ready")
            if self.clock() >= until:
                raise ApiError(504, "timeout", "the replica did not get ready in time")
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 1.5, 0.05)

    # ---- running a chunk -----------------------------------------------------

    async def _predict(self, replica: Replica, inputs: list[Any], deadline: float) -> tuple[int, Any]:
        try:
            async with asyncio.timeout(_remaining(deadline, self.clock())):
                call = asyncio.ensure_future(replica.client.call("POST", "/predict", {"inputs": inputs}))
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
            raise ApiError(502, exc.type, str(exc)) from None
        except HarnessUnavailable:
            replica.state = "dead"
            info = await self._wait_exit(replica)
            self._retire_later(replica)
            if info is None:
                raise ApiError(502, "model_crashed", "the replica dropped the connection mid-request") from None
            raise self._exit_error(info, "mid-request") from None

    async def _await_resume(self, replica: Replica, call: asyncio.Future[tuple[int, Any]]) -> None:
        resuming = replica.resuming
        assert resuming is not None
        try:
            await asyncio.shield(resuming)
        except RuntimeFailure as exc:
            call.cancel()
            self._retire_later(replica)
            raise ApiError(502, "model_crashed", f"the paused replica could not be resumed: {exc}") from None
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

    @staticmethod
    def _exit_error(info: ExitInfo, when: str) -> ApiError:
        if info.oom_killed:
            return ApiError(502, "oom", f"the model ran out of memory {when} (killed by the OOM killer)")
        code = "" if info.exit_code is None else f" with code {info.exit_code}"
        if info.detail:
            log.warning("replica exited%s %s: %s", code, when, info.detail)  # engine text: host paths stay here
        return ApiError(502, "model_crashed", f"the replica exited{code} {when}")

    # ---- bookkeeping ---------------------------------------------------------

    def _new_replica(self, replica_id: str, spec: VersionSpec, handle: str, run_dir: Path) -> Replica:
        now = self.clock()
        return Replica(
            replica_id=replica_id, spec=spec, handle=handle, run_dir=run_dir,
            client=HarnessClient(str(run_dir / SOCKET_NAME), max_idle=self.settings.replica_concurrency,
                                 max_response_bytes=self.settings.max_response_mb * 2**20,
                                 peer_ok=functools.partial(self.runtime.owns_peer, handle)),
            slots=asyncio.Semaphore(self.settings.replica_concurrency), last_used=now, started_at=now,
        )

    def _register(self, replica: Replica) -> None:
        self.replicas[replica.replica_id] = replica
        self._by_version[replica.spec.key] = replica

    async def _transition(self, replica_id: str, action: str) -> bool:
        """Pause or stop an idle replica, holding its version's lock so no request slips in meanwhile."""
        replica = self.replicas.get(replica_id)
        if replica is None:
            return False
        lock = self._locks.setdefault(replica.spec.key, asyncio.Lock())
        if lock.locked():
            return False  # a request is acquiring this version right now: not idle
        async with lock:
            if replica.in_flight or replica.state != ("running" if action == "pause" else "paused"):
                return False
            try:
                if action == "pause":
                    await self.runtime.pause(replica.handle)
                    replica.state = "paused"
                else:
                    await self.runtime.stop(replica.handle, STOP_TIMEOUT_S)
                    replica.client.close()
                    replica.state = "stopped"
            except RuntimeFailure as exc:
                log.warning("could not %s replica %s: %s", action, replica_id, exc)
                await self._retire(replica)
                return False
        return True

    async def check_alive(self) -> list[str]:
        """Retire idle replicas whose process died while nobody was talking to them."""
        dead = []
        for replica in list(self.replicas.values()):
            if replica.in_flight or replica.state not in {"running", "paused"}:
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
        image = replica.spec.image
        self.image_last_used[image] = max(self.image_last_used.get(image, 0.0), replica.last_used)
        self.replicas.pop(replica.replica_id, None)
        if self._by_version.get(replica.spec.key) is replica:
            del self._by_version[replica.spec.key]
            if replica.gpu_uuid and self.gpu is not None:
                self.gpu.release(replica.spec.key)
        replica.client.close()

    async def _retire(self, replica: Replica) -> None:
        """Forget a replica and remove its container; never raises."""
        replica.state = "dead"
        self._forget(replica)
        await self._discard_handle(replica.handle, replica.run_dir)

    def _retire_later(self, replica: Replica) -> None:
        replica.state = "dead"
        self._forget(replica)
        task = asyncio.create_task(self._discard_handle(replica.handle, replica.run_dir))
        self._cleanup_tasks.add(task)
        task.add_done_callback(self._cleanup_tasks.discard)

    async def _discard_handle(self, handle: str, run_dir: Path) -> None:
        try:
            await self.runtime.remove(handle)
        except RuntimeFailure as exc:
            log.warning("could not remove replica %s: %s", handle, exc)
        if run_dir and str(run_dir):
            self.run_dirs.remove(run_dir)
