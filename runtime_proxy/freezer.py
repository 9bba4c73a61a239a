"""Freeze and thaw a container's cgroup directly, without dockerd.

``docker unpause`` goes API → dockerd → containerd → runc → the cgroup freezer and costs ~10-20 ms;
the freezer itself thaws in microseconds. A paused replica's start is the hot path of a lukewarm
call, so the proxy writes the freezer file itself:

- cgroup v1: ``freezer.state`` (``FROZEN`` / ``THAWED``; freezing passes through ``FREEZING``),
- cgroup v2: ``cgroup.freeze`` (``1`` / ``0``; ``cgroup.events`` says ``frozen 1`` once done).

Docker does not know about such a freeze: it reports the container ``running``. Hence the owner of
this (``DockerRuntime``) reads the freezer on re-adoption to learn which ``running`` containers are
really paused, and thaws before any stop, kill or remove (a SIGTERM or SIGKILL stays pending in a
frozen v1 cgroup: dockerd would wait out its timeouts).

Only the layouts Docker's cgroupfs and systemd drivers create are looked for; where none is found or
the file cannot be written (a read-only /sys/fs/cgroup, rootless Docker), ``locate`` answers None and
the caller falls back to the Docker API.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTAINER_ID = re.compile(r"[0-9a-f]{64}")
FREEZE_BOUND_S = 2.0  # a task in uninterruptible sleep can hold a v1 freeze in FREEZING; runc gives up too


class FreezeFailed(Exception):
    """The cgroup did not reach the frozen state in time (it has been thawed again)."""


@dataclasses.dataclass(frozen=True)
class FreezerFile:
    """The one file that freezes a container's cgroup, and how to read it."""

    path: Path
    v2: bool

    def write(self, frozen: bool) -> None:
        # One write(2) (a cgroup file takes the whole value at once), and never O_CREAT: a cgroup gone
        # meanwhile is an error, not a stray file.
        value = (b"1" if frozen else b"0") if self.v2 else (b"FROZEN" if frozen else b"THAWED")
        fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value)
        finally:
            os.close(fd)

    def state(self) -> str:
        """``frozen``, ``freezing`` or ``thawed``."""
        if self.v2:
            if self.path.read_bytes().strip() != b"1":
                return "thawed"
            events = (self.path.parent / "cgroup.events").read_text()
            return "frozen" if "frozen 1" in events.splitlines() else "freezing"
        return self.path.read_text().strip().lower()


def locate(container_id: str, root: Path = CGROUP_ROOT) -> FreezerFile | None:
    """The freezer file of a Docker container, or None when there is none this process may write."""
    if not CONTAINER_ID.fullmatch(container_id):
        return None
    candidates = [
        FreezerFile(root / "freezer" / "docker" / container_id / "freezer.state", v2=False),
        FreezerFile(root / "freezer" / "system.slice" / f"docker-{container_id}.scope" / "freezer.state", v2=False),
        FreezerFile(root / "system.slice" / f"docker-{container_id}.scope" / "cgroup.freeze", v2=True),
        FreezerFile(root / "docker" / container_id / "cgroup.freeze", v2=True),
    ]
    for candidate in candidates:
        try:
            candidate.state()
        except OSError:
            continue
        return candidate
    return None


async def freeze(file: FreezerFile, bound_s: float = FREEZE_BOUND_S) -> None:
    """Freeze and wait (polling, bounded) until every task is frozen; thawed again and FreezeFailed
    when that does not happen within ``bound_s``. OSError when the file cannot be written."""
    file.write(True)
    deadline = time.monotonic() + bound_s
    pause = 0.0005
    while True:
        state = file.state()
        if state == "frozen":
            return
        if time.monotonic() >= deadline:
            file.write(False)
            raise FreezeFailed(f"the cgroup stayed {state} for {bound_s:.1f} s")
        if state == "thawed":
            file.write(True)  # a concurrent thaw (v1 may also drop back): ask again
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.02)


def thaw(file: FreezerFile) -> None:
    """Thaw at once (the kernel wakes the tasks; nothing to wait for). OSError when the file is gone."""
    file.write(False)


def is_frozen(file: FreezerFile) -> bool:
    """Frozen or on its way there; False when the cgroup is gone."""
    try:
        return file.state() != "thawed"
    except OSError:
        return False
