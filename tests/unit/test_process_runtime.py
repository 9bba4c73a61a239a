"""The process runtime's stop, against a real child process: SIGTERM, then SIGCONT for a stopped one."""
from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

import pytest

from runtime_proxy.process_runtime import ProcessRuntime


async def test_a_child_reaped_between_the_two_signals_is_stopped_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A harness exits at once on SIGTERM; asyncio's child watcher may reap it before the SIGCONT is sent
    (seen under load: the GPU swap then failed to stop the holder and killed it 5 s later)."""
    runtime = ProcessRuntime()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(60)")
    runtime._procs["h"] = proc  # noqa: SLF001 - a process as create/start would have left it
    sent: list[int] = []
    real_kill = os.kill

    def kill(pid: int, sig: int) -> None:
        sent.append(sig)
        if sig == signal.SIGCONT:
            raise ProcessLookupError(3, "No such process")  # reaped in between
        real_kill(pid, sig)

    killed: list[Any] = []

    async def no_kill(handle: str) -> None:
        killed.append(handle)

    monkeypatch.setattr(os, "kill", kill)
    monkeypatch.setattr(runtime, "kill", no_kill)
    await asyncio.wait_for(runtime.stop("h", timeout_s=5.0), 10)
    assert sent == [signal.SIGTERM, signal.SIGCONT]
    assert killed == [] and proc.returncode == -signal.SIGTERM
