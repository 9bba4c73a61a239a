"""``python -m ingress --workers N``: N processes on one port, a dead one replaced, SIGTERM drains them all."""
from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from ingress.workers import worker_command
from loadtests.common import IngressProcess, descendants
from tests.support.stack import wait_until

pytestmark = [pytest.mark.timeout(120)]


def test_a_worker_runs_the_same_flags_but_one_worker() -> None:
    assert worker_command(["--workers", "4", "--ingress-port", "9"])[-2:] == ["--ingress-port", "9"]
    assert "--workers=2" not in worker_command(["--workers=2"])


async def test_workers_share_the_port_are_replaced_and_drain(redis_url: str, state_dir: Path) -> None:
    ingress = IngressProcess(redis_url, state_dir, "workers", workers=2)
    try:
        await ingress.start()
        assert ingress.proc is not None

        def workers() -> list[int]:
            assert ingress.proc is not None
            return [pid for pid, _ in descendants(ingress.proc.pid) if pid != ingress.proc.pid]

        await wait_until(lambda: len(workers()) == 2, 20, "two workers")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            async def answers(n: int) -> bool:
                for _ in range(n):
                    async with session.get(ingress.url + "/healthz", timeout=aiohttp.ClientTimeout(total=5)) as r:
                        if r.status != 200:
                            return False
                return True

            assert await answers(20)
            victim = workers()[0]
            os.kill(victim, signal.SIGKILL)
            await wait_until(lambda: victim not in workers() and len(workers()) == 2, 20, "a new worker")
            assert await answers(20)
        before = workers()
        ingress.terminate()
        assert await asyncio.to_thread(ingress.wait, 60) == 0
        assert not any(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
                       for pid in before)
    finally:
        ingress.stop()
