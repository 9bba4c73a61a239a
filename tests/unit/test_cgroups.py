"""Per-container memory and CPU from cgroup files, for each layout Docker uses."""
from __future__ import annotations

from pathlib import Path

import pytest

from runtime_proxy.cgroups import Usage, container_usage

CID = "ab" * 32


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({f"memory/docker/{CID}/memory.usage_in_bytes": "1048576\n",
          f"cpuacct/docker/{CID}/cpuacct.usage": "2500000000\n"}, Usage(1.0, 2.5)),  # v1, cgroupfs
        ({f"system.slice/docker-{CID}.scope/memory.current": "3145728\n",
          f"system.slice/docker-{CID}.scope/cpu.stat": "usage_usec 1500000\nuser_usec 1\n"}, Usage(3.0, 1.5)),  # v2
        ({f"docker/{CID}/memory.current": "2097152\n"}, Usage(2.0, 0.0)),  # v2, cgroupfs, no cpu.stat
        ({}, None),  # gone, or not a container
        ({f"memory/docker/{CID}/memory.usage_in_bytes": "garbage"}, None),
    ],
)
def test_container_usage(tmp_path: Path, files: dict[str, str], expected: Usage | None) -> None:
    for rel, text in files.items():
        write(tmp_path, rel, text)
    assert container_usage(CID, tmp_path) == expected
