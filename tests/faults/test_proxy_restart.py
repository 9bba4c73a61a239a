"""Faults: the only runtime proxy restarts (an upgrade) while calls come in; nothing is lost."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ingress import state
from tests.support.stack import REPO_ROOT, running_stack, wait_until

pytestmark = [pytest.mark.timeout(180)]

MODELS = f"dir:{REPO_ROOT / 'tests' / 'support' / 'models'}"


async def test_calls_during_a_proxy_restart_are_held_and_answered(redis_url: str, state_dir: Path) -> None:
    async with running_stack(redis_url, state_dir, "process") as stack:
        await stack.customer("acme")
        await stack.deploy("echo", MODELS, "models:echo")
        assert (await stack.call("echo", 0))[0] == 200
        proxy = stack.proxies[0]
        proxy.stop()  # SIGTERM: it withdraws its heartbeat and stops listening
        calls = [asyncio.ensure_future(stack.call("echo", i, extra={"timeout_seconds": 60}, timeout_s=90))
                 for i in range(5)]
        dispatcher = stack.app[state.DISPATCHER]
        await wait_until(lambda: dispatcher.pending("acme/echo/main/1") == 5, 15, "the five calls held")
        assert not any(c.done() for c in calls)
        await proxy.start()
        answers = await asyncio.wait_for(asyncio.gather(*calls), 90)
        assert [(status, body) for status, body, _ in answers] == [(200, {"data": {"echo": i}}) for i in range(5)]


async def test_with_no_proxy_back_before_the_deadline_the_answer_is_503(redis_url: str, state_dir: Path) -> None:
    async with running_stack(redis_url, state_dir, "process") as stack:
        await stack.customer("acme")
        await stack.deploy("echo", MODELS, "models:echo")
        stack.proxies[0].stop()
        await wait_until(lambda: not stack.app[state.VIEW].live_proxies(), 15, "the stopped proxy to leave the view")
        # Held for its 2 s deadline, then answered: a client that waits 10 s gets the 503 (no hang).
        status, body, headers = await stack.call("echo", 1, extra={"timeout_seconds": 2}, timeout_s=10)
        assert (status, body["type"]) == (503, "unavailable") and int(headers["Retry-After"]) >= 1, body
