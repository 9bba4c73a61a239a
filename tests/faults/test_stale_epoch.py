"""Faults: a proxy partitioned away (hung, here SIGSTOP) is replaced by a new start of the same proxy id;
when it comes back its stale epoch is ignored by the ingress and it stops itself (fenced)."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from ingress import state
from loadtests.common import ProxyProcess
from tests.faults.test_proxy_restart import MODELS, echo_traffic
from tests.support.stack import running_stack, wait_until

pytestmark = [pytest.mark.timeout(180)]


async def test_a_partitioned_proxy_with_a_stale_epoch_is_ignored_and_stops(redis_url: str, state_dir: Path) -> None:
    async with running_stack(redis_url, state_dir, "process", heartbeat_ttl_s=2) as stack:
        await stack.customer("acme")
        await stack.deploy("echo", MODELS, "models:echo")
        view = stack.app[state.VIEW]
        old = stack.proxies[0]
        assert old.proc is not None
        async with echo_traffic(stack, callers=2, timeout_s=20) as traffic:
            await wait_until(lambda: traffic.tally.ok >= 10, 30, "calls flowing")
            os.kill(old.proc.pid, signal.SIGSTOP)  # partitioned: no heartbeat, no answers
            try:
                (state_dir / "again").mkdir()
                new = ProxyProcess(stack.redis_url, state_dir / "again", "process", old.proxy_id,
                                   host="127.0.0.9", heartbeat_interval_s=0.2)
                stack.proxies.append(new)  # stopped with the stack
                await new.start()
                await wait_until(lambda: view.proxies.get(old.proxy_id) is not None
                                 and view.proxies[old.proxy_id].url == new.url, 15, "the view to follow the new start")
                new_epoch = view.epochs[old.proxy_id]
            finally:
                os.kill(old.proc.pid, signal.SIGCONT)  # back: its next heartbeat finds a larger epoch
            assert old.proc.wait(timeout=30) == 0
            assert "was taken by a newer start" in old.log()
            # The old process never displaced the new one in the view, before or while it stopped.
            assert view.proxies[old.proxy_id].url == new.url and view.epochs[old.proxy_id] == new_epoch
            seen = traffic.tally.ok
            await wait_until(lambda: traffic.tally.ok >= seen + 10, 30, "calls answered by the new start")
        assert traffic.tally.lost == 0, traffic.tally.lost_examples
