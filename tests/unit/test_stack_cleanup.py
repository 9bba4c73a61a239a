"""A stack's teardown leaves no harness behind: what still runs a file under its state dir is killed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from loadtests.common import kill_processes_below

SLEEPER = "import time\ntime.sleep(60)\n"


def test_processes_running_a_file_below_the_root_are_killed_and_others_are_not(tmp_path: Path) -> None:
    inside, outside = tmp_path / "state" / "p1", tmp_path / "elsewhere"
    inside.mkdir(parents=True)
    outside.mkdir()
    (inside / "harness-1.py").write_text(SLEEPER)
    (outside / "harness-2.py").write_text(SLEEPER)
    left = subprocess.Popen([sys.executable, str(inside / "harness-1.py")])
    kept = subprocess.Popen([sys.executable, str(outside / "harness-2.py")])
    try:
        assert kill_processes_below(tmp_path / "state") == 1
        assert left.wait(timeout=10) == -9
        assert kept.poll() is None, "a process outside the state dir is left alone"
        assert kill_processes_below(tmp_path / "state") == 0
    finally:
        for proc in (left, kept):
            proc.kill()
            proc.wait(timeout=10)
