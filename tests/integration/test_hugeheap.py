"""The daemons' heap on transparent huge pages (shared/hugeheap.py), on this machine's real kernel: the
process starts again with the same pid, its heap lies on 2 MiB pages, and the switch turns it off."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from loadtests.common import IngressProcess
from shared.hugeheap import FRONTIER_BYTES, HUGE_PAGES_ENV, THP_SETTING, thp_mode

pytestmark = pytest.mark.timeout(90)
REPO = Path(__file__).resolve().parents[2]

PROBE = """
from shared.hugeheap import HeapFrontier, exec_on_huge_heap
exec_on_huge_heap()
import os, orjson
keeper = HeapFrontier()
keeper.settle()
huge = [line for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages:")][0]
heap = [line.split()[0] for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")]
start, end = (int(x, 16) for x in heap[0].split("-")) if heap else (0, 0)
print(orjson.dumps({"pid": os.getpid(), "malloc": os.environ.get("PYTHONMALLOC"), "rounds": keeper.rounds,
                    "huge_kb": int(huge.split()[1]), "heap_mb": (end - start) >> 20}).decode())
"""


@pytest.fixture(scope="module")
def thp() -> str:
    mode = thp_mode(THP_SETTING.read_text()) if THP_SETTING.exists() else ""
    if mode not in ("always", "madvise"):
        pytest.skip(f"this kernel's transparent huge pages are {mode or 'absent'}: the daemons keep 4 KiB pages")
    return mode


def probe(**env: str) -> dict[str, object]:
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONMALLOC", "GLIBC_TUNABLES")} | env
    proc = subprocess.Popen([sys.executable, "-c", PROBE], cwd=REPO, env=environ, stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    result = orjson.loads(out)
    assert result["pid"] == proc.pid  # exec: the same process, as a supervisor sees it
    return result


def test_a_daemon_process_starts_again_on_huge_pages_with_its_frontier_resident(thp: str) -> None:
    got = probe()
    assert got["malloc"] == "malloc" and got["rounds"] == 1
    # The reserve and the frontier (FRONTIER_BYTES at least each) are resident, on 2 MiB pages.
    assert isinstance(got["huge_kb"], int) and got["huge_kb"] >= 2 * FRONTIER_BYTES >> 10
    assert isinstance(got["heap_mb"], int) and got["heap_mb"] >= 2 * FRONTIER_BYTES >> 20


def test_switched_off_it_stays_on_small_pages(thp: str) -> None:
    got = probe(**{HUGE_PAGES_ENV: "0"})
    assert got["malloc"] is None and got["rounds"] == 0


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def _huge_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


async def test_the_ingress_daemon_serves_from_a_huge_page_heap(thp: str, redis_url: str, tmp_path: Path) -> None:
    on, off = IngressProcess(redis_url, tmp_path, "huge"), IngressProcess(redis_url, tmp_path, "small", huge_pages=0)
    for ingress in (on, off):
        for name in ("PYTHONMALLOC", "GLIBC_TUNABLES"):
            ingress.env.pop(name, None)
    try:
        await on.start()
        await off.start()  # start() waits for /healthz: both serve
        assert on.proc is not None and off.proc is not None
        assert _environ(on.proc.pid).get("PYTHONMALLOC") == "malloc"
        assert "glibc.malloc.hugetlb=1" in _environ(on.proc.pid).get("GLIBC_TUNABLES", "").split(":")
        assert _huge_kb(on.proc.pid) >= 2 * FRONTIER_BYTES >> 10  # its reserve and frontier, on 2 MiB pages
        assert "PYTHONMALLOC" not in _environ(off.proc.pid)
    finally:
        on.stop()
        off.stop()
