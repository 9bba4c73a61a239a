"""The runtime interface: what the proxy needs from a container engine.

Two implementations share it: ``docker`` (production) and ``process`` (the
same harness as a subprocess, for laptops without Docker). The replica
manager only ever talks to this interface.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Collection
from pathlib import Path
from typing import Protocol

import orjson

from shared.messages import VersionSpec

# Where the harness and its socket directory appear inside a container.
HARNESS_IN_CONTAINER = "/lukewarm/harness.py"
RUN_DIR_IN_CONTAINER = "/lukewarm/run"
SOCKET_NAME = "harness.sock"


class RuntimeFailure(Exception):
    """A runtime operation failed; ``type`` is the machine error type to report."""

    def __init__(self, type_: str, message: str) -> None:
        super().__init__(message)
        self.type = type_


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to create one replica of a version on this host."""

    replica_id: str
    spec: VersionSpec
    proxy_id: str
    run_dir: Path  # host directory mounted at RUN_DIR_IN_CONTAINER
    harness_path: Path  # host file mounted at HARNESS_IN_CONTAINER
    gpu_uuid: str | None = None  # the one GPU this replica may see

    @property
    def socket_path(self) -> Path:
        return self.run_dir / SOCKET_NAME


@dataclasses.dataclass(frozen=True)
class ExitInfo:
    """Why a replica is no longer running."""

    exit_code: int | None
    oom_killed: bool = False
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class FoundReplica:
    """A replica found on the host at start-up (for re-adoption)."""

    handle: str
    replica_id: str
    spec: VersionSpec
    state: str  # running | paused | exited | created
    run_dir: Path
    gpu_uuid: str | None = None


class Runtime(Protocol):
    """A container engine as the replica manager sees it. All calls are async and bounded."""

    name: str

    async def has_image(self, image: str) -> bool: ...

    async def pull(self, image: str) -> None: ...

    async def resolve_image(self, image: str) -> str:
        """What a version of ``image`` (pulled when missing) runs forever, pinned at deploy: a reference any
        host can pull that names one content (``name@sha256:…``) when a registry knows it, else the content
        id; "" when the runtime has no such id. RuntimeFailure ``image_unavailable`` when there is no such image."""
        ...

    async def pullable(self, image: str) -> bool:
        """Whether removing ``image`` here loses nothing (it can be pulled again, or is gone): pruning
        never removes an image no registry could hand back."""
        ...

    async def create(self, launch: LaunchSpec) -> str: ...

    async def start(self, handle: str) -> None: ...

    async def pause(self, handle: str) -> None: ...

    async def unpause(self, handle: str) -> None: ...

    async def stop(self, handle: str, timeout_s: float) -> None: ...

    async def kill(self, handle: str) -> None: ...

    async def remove_image(self, image: str) -> None: ...

    async def remove(self, handle: str) -> None: ...

    async def exit_info(self, handle: str) -> ExitInfo | None:
        """None while the replica is running or paused."""
        ...

    async def exited(self, handles: Collection[str]) -> set[str]:
        """Those of ``handles`` no longer running or paused (or gone), in one cheap question: the reaper
        asks every round for every replica, and a ``docker inspect`` each held the loop for the GIL."""
        ...

    async def list_replicas(self, proxy_id: str) -> list[FoundReplica]: ...

    def owns_peer(self, handle: str, pid: int) -> bool:
        """Whether host process ``pid`` belongs to replica ``handle`` (who listens on its socket)."""
        ...

    async def close(self) -> None: ...


def labels_for(launch: LaunchSpec) -> dict[str, str]:
    spec = launch.spec
    return {
        "lukewarm.customer": spec.customer,
        "lukewarm.model": spec.model,
        "lukewarm.branch": spec.branch,
        "lukewarm.version": str(spec.version),
        "lukewarm.proxy": launch.proxy_id,
        "lukewarm.replica": launch.replica_id,
        "lukewarm.run_dir": str(launch.run_dir),
        "lukewarm.gpu": launch.gpu_uuid or "",
        "lukewarm.spec": orjson.dumps(spec.to_dict()).decode(),
    }


def harness_env(spec: VersionSpec, socket_path: str, code_dir: str | None = None,
                gpu_uuid: str | None = None) -> dict[str, str]:
    env = dict(spec.env)
    # Always set here, whatever the deploy's env said: where nvidia is Docker's default runtime,
    # NVIDIA_VISIBLE_DEVICES=all would hand a CPU version every GPU. "void" exposes none.
    env["CUDA_VISIBLE_DEVICES"] = gpu_uuid or ""
    env["NVIDIA_VISIBLE_DEVICES"] = gpu_uuid or "void"
    env.update({
        "LUKEWARM_ENTRYPOINT": spec.entrypoint,
        "LUKEWARM_SOCKET": socket_path,
        "LUKEWARM_BATCH_SIZE": "" if spec.batch_size is None else str(spec.batch_size),
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    })
    if code_dir:
        env["LUKEWARM_CODE_DIR"] = code_dir
    return env
