"""Memory and CPU a container uses, read from its cgroup files (no Docker API call: the
heartbeat reads them every few seconds for every replica, and `docker stats` takes ~1 s each).

Docker's cgroupfs layouts: v1 ``/sys/fs/cgroup/{memory,cpuacct}/docker/<id>/`` and v2
``/sys/fs/cgroup/system.slice/docker-<id>.scope/`` (systemd driver) or ``/sys/fs/cgroup/docker/<id>/``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclasses.dataclass(frozen=True)
class Usage:
    memory_mb: float
    cpu_s: float


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _cpu_v2(path: Path) -> float | None:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "usage_usec":
                return int(value) / 1e6
    except (OSError, ValueError):
        return None
    return None


def container_usage(container_id: str, root: Path = CGROUP_ROOT) -> Usage | None:
    """The container's current memory (MiB) and total CPU time (s); None when no cgroup is found."""
    memory = _read_int(root / "memory" / "docker" / container_id / "memory.usage_in_bytes")
    if memory is not None:
        cpu_ns = _read_int(root / "cpuacct" / "docker" / container_id / "cpuacct.usage") or 0
        return Usage(memory_mb=round(memory / 2**20, 1), cpu_s=round(cpu_ns / 1e9, 3))
    for group in (root / "system.slice" / f"docker-{container_id}.scope", root / "docker" / container_id):
        memory = _read_int(group / "memory.current")
        if memory is not None:
            return Usage(memory_mb=round(memory / 2**20, 1), cpu_s=round(_cpu_v2(group / "cpu.stat") or 0.0, 3))
    return None
