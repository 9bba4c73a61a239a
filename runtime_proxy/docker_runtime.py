"""The Docker runtime: the only module that imports the Docker SDK.

The SDK is blocking, so every call goes through ``asyncio.to_thread`` with
a bounded HTTP timeout on the client itself.
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.types
import orjson

from runtime_proxy.runtime import (
    HARNESS_IN_CONTAINER,
    RUN_DIR_IN_CONTAINER,
    SOCKET_NAME,
    ExitInfo,
    FoundReplica,
    LaunchSpec,
    RuntimeFailure,
    harness_env,
    labels_for,
)
from shared.messages import VersionSpec

# A replica's user: nobody. The model never runs as root, even inside its container.
CONTAINER_USER = "65534:65534"
PIDS_LIMIT = 256
TMPFS_MB = 64
OPEN_FILES = 4096


def _name_of(reference: str) -> str:
    """A reference without its tag or digest (``reg:5000/a/b:1@sha256:…`` → ``reg:5000/a/b``)."""
    name = reference.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def docker_available(timeout_s: float = 3.0) -> bool:
    """True when a Docker engine answers a ping within ``timeout_s``."""
    try:
        client = docker.from_env(timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - any failure means "no engine here"
        return False


def container_options(launch: LaunchSpec, log_max_mb: int = 10) -> dict[str, Any]:
    """The create() options of a replica: the hardening of DESIGN.md lives here."""
    spec = launch.spec
    memory = f"{spec.memory_mb}m"
    return {
        # The content the version was pinned to at deploy, when known: a retag changes nothing here.
        "image": spec.image_id or spec.image,
        "command": ["python3", HARNESS_IN_CONTAINER],
        "name": f"lw-{launch.replica_id}",
        "labels": labels_for(launch),
        "environment": harness_env(spec, f"{RUN_DIR_IN_CONTAINER}/{SOCKET_NAME}", gpu_uuid=launch.gpu_uuid),
        "volumes": {
            str(launch.harness_path): {"bind": HARNESS_IN_CONTAINER, "mode": "ro"},
            str(launch.run_dir): {"bind": RUN_DIR_IN_CONTAINER, "mode": "rw"},
        },
        "network_mode": "none",
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "read_only": True,
        "tmpfs": {"/tmp": f"rw,noexec,nosuid,size={TMPFS_MB}m"},
        "pids_limit": PIDS_LIMIT,
        "nano_cpus": int(spec.cpus * 1e9),
        "ulimits": [docker.types.Ulimit(name="nofile", soft=OPEN_FILES, hard=OPEN_FILES)],
        # A model printing in a loop must not fill the host's disk through Docker's log.
        "log_config": docker.types.LogConfig(type="json-file", config={"max-size": f"{log_max_mb}m", "max-file": "2"}),
        "ipc_mode": "private",
        "mem_limit": memory,
        "memswap_limit": memory,  # no swap: an over-limit model is OOM-killed, not slowed to a crawl
        "user": CONTAINER_USER,
        # A tiny init reaps zombies and forwards SIGTERM, so stop takes ms, not 10 s.
        "init": True,
        "detach": True,
        **({"device_requests": [docker.types.DeviceRequest(device_ids=[launch.gpu_uuid], capabilities=[["gpu"]])]}
           if launch.gpu_uuid else {}),
    }


class DockerRuntime:
    """Replicas as Docker containers on the local engine."""

    name = "docker"

    def __init__(self, api_timeout_s: float = 30.0, log_max_mb: int = 10) -> None:
        self._api_timeout_s = api_timeout_s
        self._log_max_mb = log_max_mb
        self._client: docker.DockerClient | None = None

    def _docker(self) -> docker.DockerClient:
        if self._client is None:
            self._client = docker.from_env(timeout=self._api_timeout_s)
        return self._client

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except docker.errors.ImageNotFound as exc:
            raise RuntimeFailure("image_unavailable", f"image not found: {exc.explanation or exc}") from exc
        except docker.errors.NotFound as exc:
            raise RuntimeFailure("replica_gone", f"container not found: {exc.explanation or exc}") from exc
        except docker.errors.APIError as exc:
            raise RuntimeFailure("runtime_error", f"docker: {exc.explanation or exc}") from exc
        except docker.errors.DockerException as exc:
            raise RuntimeFailure("runtime_error", f"docker: {exc}") from exc

    async def has_image(self, image: str) -> bool:
        try:
            await self._call(self._docker().images.get, image)
            return True
        except RuntimeFailure as exc:
            if exc.type == "image_unavailable":
                return False
            raise

    async def pull(self, image: str) -> None:
        try:
            await self._call(self._docker().images.pull, image)
        except RuntimeFailure as exc:
            raise RuntimeFailure("image_unavailable", f"cannot pull image {image!r}: {exc}") from exc

    async def resolve_image(self, image: str) -> str:
        if not await self.has_image(image):
            await self.pull(image)
        attrs = (await self._call(self._docker().images.get, image)).attrs
        # The engine answers `name@sha256:<image id>` with that image whatever its name: insist that the
        # image really carries the name asked for, or one customer's name could reach another's image.
        wanted = _name_of(image)
        names = {_name_of(n) for n in (attrs.get("RepoTags") or []) + (attrs.get("RepoDigests") or [])}
        if wanted not in names:
            raise RuntimeFailure("image_unavailable", f"no image named {wanted} holds {image}")
        return str(attrs["Id"])

    async def create(self, launch: LaunchSpec) -> str:
        container = await self._call(self._docker().containers.create, **container_options(launch, self._log_max_mb))
        return str(container.id)

    async def _container(self, handle: str) -> Any:
        return await self._call(self._docker().containers.get, handle)

    async def start(self, handle: str) -> None:
        await self._call(self._docker().api.start, handle)

    async def pause(self, handle: str) -> None:
        await self._call(self._docker().api.pause, handle)

    async def unpause(self, handle: str) -> None:
        await self._call(self._docker().api.unpause, handle)

    async def stop(self, handle: str, timeout_s: float) -> None:
        try:
            await self._call(self._docker().api.stop, handle, timeout=max(0, int(timeout_s)))
        except RuntimeFailure as exc:
            if exc.type != "replica_gone":
                raise

    async def kill(self, handle: str) -> None:
        try:
            await self._call(self._docker().api.kill, handle)
        except RuntimeFailure:
            pass  # already dead is what we wanted

    async def remove_image(self, image: str) -> None:
        """Remove a model image; one still used by any container (running or not) is kept."""
        try:
            await self._call(self._docker().images.remove, image, noprune=False)
        except RuntimeFailure as exc:
            if exc.type not in {"image_unavailable", "replica_gone"}:
                raise

    async def remove(self, handle: str) -> None:
        try:
            await self._call(self._docker().api.remove_container, handle, force=True)
        except RuntimeFailure as exc:
            if exc.type != "replica_gone":
                raise

    async def exit_info(self, handle: str) -> ExitInfo | None:
        try:
            attrs = await self._call(self._docker().api.inspect_container, handle)
        except RuntimeFailure as exc:
            if exc.type == "replica_gone":
                return ExitInfo(exit_code=None, detail="container removed")
            raise
        state = attrs.get("State", {})
        if state.get("Running") or state.get("Paused"):
            return None
        if state.get("Status") == "created":
            return None
        return ExitInfo(
            exit_code=state.get("ExitCode"),
            oom_killed=bool(state.get("OOMKilled")),
            detail=state.get("Error") or "",
        )

    async def list_replicas(self, proxy_id: str) -> list[FoundReplica]:
        containers = await self._call(
            self._docker().containers.list, all=True, filters={"label": f"lukewarm.proxy={proxy_id}"}
        )
        found = []
        for container in containers:
            labels = container.labels or {}
            try:
                spec = VersionSpec.from_dict(orjson.loads(labels["lukewarm.spec"]))
            except (KeyError, ValueError, TypeError):
                continue  # not ours to adopt: labels from an incompatible version
            found.append(FoundReplica(
                handle=str(container.id), replica_id=labels.get("lukewarm.replica", container.name),
                spec=spec, state=container.status, run_dir=Path(labels.get("lukewarm.run_dir", "")),
                gpu_uuid=labels.get("lukewarm.gpu") or None,
            ))
        return found

    def owns_peer(self, handle: str, pid: int) -> bool:
        """The process's cgroup names this container (v1 and v2, cgroupfs and systemd drivers)."""
        try:
            with open(f"/proc/{pid}/cgroup", encoding="ascii", errors="replace") as f:
                return len(handle) == 64 and handle in f.read()
        except OSError:
            return False

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await asyncio.to_thread(client.close)


def build_image(context_dir: str, tag: str, timeout_s: float = 600.0) -> str:
    """Build a model image from a local directory (no registry: its FROM must be local). Blocking."""
    client = docker.from_env(timeout=int(timeout_s))
    try:
        image, _ = client.images.build(path=context_dir, tag=tag, rm=True, pull=False)
        return str(image.id)
    except docker.errors.BuildError as exc:
        lines = [str(chunk.get("stream") or chunk.get("error") or "").strip() for chunk in exc.build_log]
        tail = " | ".join(line for line in lines if line)[-400:]
        raise RuntimeFailure("image_build_failed", f"cannot build {tag} from {context_dir}: {exc.msg} ({tail})") from None
    except docker.errors.APIError as exc:
        raise RuntimeFailure("image_build_failed", f"cannot build {tag}: {exc.explanation or exc}") from None
    finally:
        client.close()
