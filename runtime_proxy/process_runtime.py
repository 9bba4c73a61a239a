"""The process runtime: the harness as a local subprocess (pause = SIGSTOP).

The embedded default where no Docker engine answers. An image here is a
code directory, written ``dir:/path/to/code`` (or a plain existing path).
It gives no isolation: it is for laptops and tests, not for tenants.
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Collection
from pathlib import Path

from runtime_proxy.runtime import ExitInfo, FoundReplica, LaunchSpec, RuntimeFailure, harness_env


def code_dir_of(image: str) -> Path | None:
    """The code directory an image names for this runtime, or None."""
    path = Path(image[4:] if image.startswith("dir:") else image)
    return path if path.is_dir() else None


class ProcessRuntime:
    """Replicas as child processes of the proxy."""

    name = "process"

    def __init__(self, python: str | None = None) -> None:
        self._python = python or sys.executable
        self._launches: dict[str, LaunchSpec] = {}
        self._procs: dict[str, asyncio.subprocess.Process] = {}

    async def has_image(self, image: str) -> bool:
        return code_dir_of(image) is not None

    async def pull(self, image: str) -> None:
        raise RuntimeFailure(
            "image_unavailable", f"the process runtime runs only code directories ('dir:/path'), not {image!r}"
        )

    async def resolve_image(self, image: str) -> str:
        if code_dir_of(image) is None:
            await self.pull(image)
        return ""  # a code directory has no content id: it is the admin's own, for a laptop

    async def create(self, launch: LaunchSpec) -> str:
        if code_dir_of(launch.spec.image) is None:
            await self.pull(launch.spec.image)
        self._launches[launch.replica_id] = launch
        return launch.replica_id

    async def start(self, handle: str) -> None:
        launch = self._launches[handle]
        code_dir = code_dir_of(launch.spec.image)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        env.update(harness_env(launch.spec, str(launch.socket_path), str(code_dir), launch.gpu_uuid))
        self._procs[handle] = await asyncio.create_subprocess_exec(
            self._python, str(launch.harness_path), env=env, cwd=str(code_dir),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
        )

    def _signal(self, handle: str, sig: int) -> None:
        proc = self._procs.get(handle)
        if proc is None or proc.returncode is not None:
            raise RuntimeFailure("replica_gone", f"process {handle} is not running")
        os.kill(proc.pid, sig)

    async def pause(self, handle: str) -> None:
        self._signal(handle, signal.SIGSTOP)

    async def unpause(self, handle: str) -> None:
        self._signal(handle, signal.SIGCONT)

    async def stop(self, handle: str, timeout_s: float) -> None:
        proc = self._procs.get(handle)
        if proc is None or proc.returncode is not None:
            return
        # A stopped process cannot act on SIGTERM until continued. It may exit on the SIGTERM and be reaped
        # (asyncio's child watcher) before the SIGCONT: gone is what a stop wants, not an error.
        for sig in (signal.SIGTERM, signal.SIGCONT):
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                break
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            await self.kill(handle)

    async def kill(self, handle: str) -> None:
        proc = self._procs.get(handle)
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()

    async def remove_image(self, image: str) -> None:
        return None  # a code directory is the user's own: never deleted

    async def pullable(self, image: str) -> bool:
        return True  # "removing" one deletes nothing (above): pruning only forgets it

    async def remove(self, handle: str) -> None:
        await self.kill(handle)
        self._procs.pop(handle, None)
        self._launches.pop(handle, None)

    async def exit_info(self, handle: str) -> ExitInfo | None:
        proc = self._procs.get(handle)
        if proc is None:
            return ExitInfo(exit_code=None, detail="process not found")
        if proc.returncode is None:
            return None
        # The kernel's OOM killer sends SIGKILL; without cgroups we cannot tell it apart.
        return ExitInfo(exit_code=proc.returncode)

    async def exited(self, handles: Collection[str]) -> set[str]:
        return {h for h in handles if (proc := self._procs.get(h)) is None or proc.returncode is not None}

    def owns_peer(self, handle: str, pid: int) -> bool:
        proc = self._procs.get(handle)
        return proc is not None and proc.pid == pid

    async def list_replicas(self, proxy_id: str) -> list[FoundReplica]:
        return []  # children do not outlive the proxy: nothing to re-adopt

    async def close(self) -> None:
        for handle in list(self._procs):
            await self.remove(handle)
